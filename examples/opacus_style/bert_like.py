#!/usr/bin/env python3
"""Private fine-tuning of the upper layers of a BERT-like text classifier, written the way Opacus' tutorial
``tutorials/building_text_classifier.ipynb`` is written: freeze everything but the last encoder layer, the
pooler and the classifier, ``make_private_with_epsilon``, and ``BatchMemoryManager`` for logical batches
larger than the physical ones; the model returns ``(loss, logits)`` like Hugging Face's
``BertForSequenceClassification`` and is called with ``model(**inputs)``.

The changed lines are marked ``# <- was:`` (the Opacus line each replaces). The model is a small BERT built
here from ``nn.Embedding`` + ``nn.TransformerEncoder`` + ``nn.Linear`` (no Hugging Face; its random
initialization stands in for the pre-trained weights), so its ``nn.MultiheadAttention`` is converted by
``ModuleValidator.fix``. The sentence pairs are synthetic (the label is the relation keyword the pair
contains), so nothing is downloaded.

    python examples/opacus_style/bert_like.py --epochs 1
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from dpsat_fast import PrivacyEngine  # <- was: from opacus import PrivacyEngine
from dpsat_fast.utils import BatchMemoryManager  # <- was: from opacus.utils.batch_memory_manager import BatchMemoryManager
from dpsat_fast.validators import ModuleValidator  # <- was: from opacus.validators import ModuleValidator

LABEL_LIST = ["contradiction", "entailment", "neutral"]
MAX_SEQ_LENGTH = 24
VOCAB_SIZE = 200  # 0 = [PAD], 1 = [CLS], 2 = [SEP], 3..5 = the relation keywords, the rest ordinary words
PAD, CLS, SEP = 0, 1, 2


class BertLikeForSequenceClassification(nn.Module):
    """Word + position + token-type embeddings, a batch-first transformer encoder, a tanh pooler on the
    first token and a linear classifier; ``forward(input_ids, attention_mask, token_type_ids, labels)``
    returns ``(loss, logits)`` (``(logits,)`` without labels)."""

    def __init__(self, vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4, num_labels=3):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=PAD)
        self.position_embeddings = nn.Embedding(MAX_SEQ_LENGTH, hidden_size)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        self.embeddings_norm = nn.LayerNorm(hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, dim_feedforward=2 * hidden_size, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.pooler = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh())
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        h = self.embeddings_norm(h)
        padding_mask = None if attention_mask is None else attention_mask == 0
        h = self.encoder(h, src_key_padding_mask=padding_mask)
        logits = self.classifier(self.pooler(h[:, 0]))
        if labels is None:
            return (logits,)
        return nn.functional.cross_entropy(logits, labels), logits


def synthetic_pairs(n, seed):
    """``n`` padded ``[CLS] premise [SEP] hypothesis [SEP]`` pairs; the hypothesis contains the keyword of
    its label. Returns a TensorDataset(input_ids, attention_mask, token_type_ids, labels)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.full((n, MAX_SEQ_LENGTH), PAD, dtype=torch.long)
    token_type_ids = torch.zeros(n, MAX_SEQ_LENGTH, dtype=torch.long)
    labels = torch.randint(0, len(LABEL_LIST), (n,), generator=g)
    for i in range(n):
        la, lb = (int(v) for v in torch.randint(3, 9, (2,), generator=g))
        premise = torch.randint(6, VOCAB_SIZE, (la,), generator=g)
        hypothesis = torch.randint(6, VOCAB_SIZE, (lb,), generator=g)
        hypothesis[int(torch.randint(0, lb, (1,), generator=g))] = 3 + labels[i]
        seq = torch.cat([torch.tensor([CLS]), premise, torch.tensor([SEP]), hypothesis, torch.tensor([SEP])])
        input_ids[i, :len(seq)] = seq
        token_type_ids[i, la + 2:len(seq)] = 1
    attention_mask = (input_ids != PAD).long()
    return TensorDataset(input_ids, attention_mask, token_type_ids, labels)


def accuracy(preds, labels):
    return (preds == labels).mean()


def evaluate(model, test_dataloader, device):
    model.eval()
    loss_arr, accuracy_arr = [], []
    for batch in test_dataloader:
        batch = tuple(t.to(device) for t in batch)
        with torch.no_grad():
            inputs = {"input_ids": batch[0], "attention_mask": batch[1], "token_type_ids": batch[2],
                      "labels": batch[3]}
            loss, logits = model(**inputs)[:2]
            preds = np.argmax(logits.detach().cpu().numpy(), axis=1)
            loss_arr.append(loss.item())
            accuracy_arr.append(accuracy(preds, inputs["labels"].cpu().numpy()))
    model.train()
    return np.mean(loss_arr), np.mean(accuracy_arr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus-style BERT text classifier (small BERT, synthetic pairs)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=256, help="number of synthetic training pairs")
    parser.add_argument("--batch-size", type=int, default=32, help="logical batch size (BATCH_SIZE)")
    parser.add_argument("--max-physical-batch-size", type=int, default=8, help="MAX_PHYSICAL_BATCH_SIZE")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--epsilon", type=float, default=7.5, help="target ε")
    parser.add_argument("--delta", type=float, default=1e-5, help="target δ")
    parser.add_argument("-c", "--max-grad-norm", type=float, default=0.1, help="MAX_GRAD_NORM")
    parser.add_argument("--accountant", type=str, default="prv", help="privacy accountant (rdp, prv, gdp)")
    parser.add_argument("--logging-interval", type=int, default=20, help="physical steps between evaluations")
    parser.add_argument("--device", type=str, default="cpu")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    train_dataset = synthetic_pairs(args.n_train, seed=0)
    test_dataset = synthetic_pairs(256, seed=1)
    train_dataloader = DataLoader(train_dataset, batch_size=args.batch_size)
    test_dataloader = DataLoader(test_dataset, sampler=SequentialSampler(test_dataset), batch_size=args.batch_size)

    model = BertLikeForSequenceClassification()

    # fine-tune only the last encoder layer, the pooler and the classifier
    trainable_layers = [model.encoder.layers[-1], model.pooler, model.classifier]
    total_params = 0
    trainable_params = 0
    for p in model.parameters():
        p.requires_grad = False
        total_params += p.numel()
    for layer in trainable_layers:
        for p in layer.parameters():
            p.requires_grad = True
            trainable_params += p.numel()
    print(f"Total parameters count: {total_params:,}")
    print(f"Trainable parameters count: {trainable_params:,}")

    # nn.MultiheadAttention has no per-sample gradient: swap in the DP attention (same weights)
    model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=False)

    model = model.to(device)
    model = model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-8)

    privacy_engine = PrivacyEngine(accountant=args.accountant)
    model, optimizer, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train_dataloader,
        target_delta=args.delta,
        target_epsilon=args.epsilon,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
    )
    print(f"Using sigma={optimizer.noise_multiplier} and C={args.max_grad_norm}")

    losses = []
    for epoch in range(1, args.epochs + 1):
        with BatchMemoryManager(
            data_loader=train_dataloader,
            max_physical_batch_size=args.max_physical_batch_size,
            optimizer=optimizer,
        ) as memory_safe_data_loader:
            for step, batch in enumerate(memory_safe_data_loader):
                optimizer.zero_grad()
                batch = tuple(t.to(device) for t in batch)
                inputs = {"input_ids": batch[0], "attention_mask": batch[1], "token_type_ids": batch[2],
                          "labels": batch[3]}
                outputs = model(**inputs)  # output = loss, logits
                loss = outputs[0]
                loss.backward()
                losses.append(loss.item())
                optimizer.step()

                if step > 0 and step % args.logging_interval == 0:
                    eps = privacy_engine.get_epsilon(args.delta)
                    eval_loss, eval_accuracy = evaluate(model, test_dataloader, device)
                    print(f"Epoch: {epoch} | Step: {step} | Train loss: {np.mean(losses):.3f} | "
                          f"Eval loss: {eval_loss:.3f} | Eval accuracy: {eval_accuracy:.3f} | ɛ: {eps:.2f}")

    eval_loss, eval_accuracy = evaluate(model, test_dataloader, device)
    eps = privacy_engine.get_epsilon(args.delta)
    print(f"Final | Train loss: {np.mean(losses):.3f} | Eval loss: {eval_loss:.3f} | "
          f"Eval accuracy: {eval_accuracy:.3f} | ɛ: {eps:.2f}")
    return {"accuracy": eval_accuracy, "epsilon": eps, "losses": losses, "model": model, "optimizer": optimizer,
            "train_loader": train_dataloader, "privacy_engine": privacy_engine, "args": args}


if __name__ == "__main__":
    main()
