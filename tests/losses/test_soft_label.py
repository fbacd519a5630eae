"""soft_label_kl against a naive per-query computation, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unime.losses import soft_label_kl


def unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def batch(b: int = 4, k: int = 3, d: int = 8):
    query, positive, negatives = unit(b, d, seed=0), unit(b, d, seed=1), unit(b, k, d, seed=2)
    teacher = torch.randn(b, 1 + k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return query, positive, negatives, teacher


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def naive(query, positive, negatives, teacher, temperature, teacher_temperature, symmetric) -> float:
    total = 0.0
    for i in range(query.shape[0]):
        candidates = [positive[i]] + [negatives[i, m] for m in range(negatives.shape[1])]
        student = softmax([float(query[i] @ c) / temperature for c in candidates])
        target = softmax([float(s) / teacher_temperature for s in teacher[i]])
        total += 0.5 * (kl(target, student) + kl(student, target)) if symmetric else kl(target, student)
    return total / query.shape[0]


def student_similarities(query, positive, negatives) -> torch.Tensor:
    candidates = torch.cat([positive.unsqueeze(1), negatives], dim=1)  # [B, 1 + K, D]
    return torch.einsum("bd,bkd->bk", query, candidates)  # [B, 1 + K]


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_when_the_teacher_agrees_with_the_student(symmetric):
    query, positive, negatives, _ = batch()
    teacher = student_similarities(query, positive, negatives)
    loss = soft_label_kl(query, positive, negatives, teacher, temperature=0.05, symmetric=symmetric)
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(0.05, None), (0.05, 0.5), (1.0, 0.1)])
def test_matches_naive_computation(symmetric, temperature, teacher_temperature):
    query, positive, negatives, teacher = batch()
    loss = soft_label_kl(
        query,
        positive,
        negatives,
        teacher,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        symmetric=symmetric,
    )
    expected_teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    expected = naive(query, positive, negatives, teacher, temperature, expected_teacher_temperature, symmetric)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert loss.item() > 0


def test_symmetric_and_one_sided_differ():
    query, positive, negatives, teacher = batch()
    symmetric = soft_label_kl(query, positive, negatives, teacher, temperature=0.1, symmetric=True)
    one_sided = soft_label_kl(query, positive, negatives, teacher, temperature=0.1, symmetric=False)
    assert abs(symmetric.item() - one_sided.item()) > 1e-3


def test_gradients_reach_the_student_but_not_the_teacher():
    query, positive, negatives, teacher = (x.clone().requires_grad_(True) for x in batch())
    soft_label_kl(query, positive, negatives, teacher, temperature=0.1).backward()
    for tensor in (query, positive, negatives):
        assert bool((tensor.grad.reshape(-1, tensor.shape[-1]).abs().sum(dim=-1) > 0).all())
    assert teacher.grad is None


def test_shape_errors_name_both_shapes():
    query, positive, negatives, teacher = batch()
    with pytest.raises(ValueError, match=r"\(4, 4\).*teacher_scores \(4, 3\)"):
        soft_label_kl(query, positive, negatives, teacher[:, :3])
    with pytest.raises(ValueError, match=r"\(4, 4\).*teacher_scores \(3, 4\)"):
        soft_label_kl(query, positive, negatives, teacher[:3])
    with pytest.raises(ValueError, match=r"query \(4, 8\).*negatives \(4, 3, 6\)"):
        soft_label_kl(query, positive, negatives[..., :6], teacher)
    with pytest.raises(ValueError, match=r"query \(4, 8\).*positive \(2, 8\)"):
        soft_label_kl(query, positive[:2], negatives, teacher)
    with pytest.raises(ValueError, match="teacher_temperature=-1"):
        soft_label_kl(query, positive, negatives, teacher, teacher_temperature=-1.0)
