"""The released budgeted-batch evaluation written literally, as a reference for l2w_dist.evaluate.

It follows the released dynamic_evaluate (kalviny/MSDNet-PyTorch, LeapLabTHU/L2W-DEN
tools/adaptive_inference.py) step by step. Only change: the tensors are turned into Python
lists first, for speed; the values and the order of every comparison are the same.
"""

from __future__ import annotations

import math

import torch


def literal_softmax_max(logits):
    max_preds, argmax_preds = [], []
    for k in range(logits.shape[0]):
        m, a = torch.nn.Softmax(dim=1)(logits[k]).max(dim=1)
        max_preds.append(m)
        argmax_preds.append(a)
    return torch.stack(max_preds), torch.stack(argmax_preds)


def literal_find_threshold(max_preds, p):
    n_stage, n_sample = max_preds.shape
    _, sorted_idx = max_preds.sort(dim=1, descending=True)
    mp = max_preds.tolist()
    si = sorted_idx.tolist()
    filtered = [0] * n_sample
    T = [1e8] * n_stage
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor(n_sample * p[k])  # p[k] a float32 tensor: float32 product
        for i in range(n_sample):
            ori_idx = si[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = mp[k][ori_idx]
                    break
        for i in range(n_sample):  # filtered.add_(max_preds[k].ge(T[k]))
            filtered[i] += 1 if mp[k][i] >= T[k] else 0
    T[n_stage - 1] = -1e8
    return T


def literal_with_threshold(max_preds, argmax_preds, targets, flops, T):
    n_stage, n_sample = max_preds.shape
    mp, ap, tg = max_preds.tolist(), argmax_preds.tolist(), targets.tolist()
    acc, exp = 0, [0] * n_stage
    for i in range(n_sample):
        for k in range(n_stage):
            if mp[k][i] >= T[k]:
                if tg[i] == ap[k][i]:
                    acc += 1
                exp[k] += 1
                break
    expected_flops = 0.0
    for k in range(n_stage):
        expected_flops += exp[k] / n_sample * flops[k]
    return acc, exp, expected_flops


def literal_budgeted(h_logits, h_labels, t_logits, t_labels, flops, ps):
    h_max, _ = literal_softmax_max(h_logits)
    t_max, t_arg = literal_softmax_max(t_logits)
    n_stage, n_test = t_max.shape
    out = []
    for p in ps:
        _p = torch.FloatTensor(1).fill_(p)
        probs = torch.exp(torch.log(_p) * torch.arange(1, n_stage + 1).float())
        probs /= probs.sum()
        T = literal_find_threshold(h_max, probs)
        acc, exp, exp_flops = literal_with_threshold(t_max, t_arg, t_labels, flops, T)
        out.append({"p": p, "flops": exp_flops, "top1": acc * 100.0 / n_test, "T": T, "exp": exp})
    return out
