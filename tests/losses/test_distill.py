"""similarity_kl (UniME stage 1) against a hand-computed case and a naive per-query loop, its gradients and checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unime.losses.distill import similarity_kl


def unit(*shape: int, seed: int) -> torch.Tensor:
    """Random L2-normalised vectors in float64, so comparisons can be tight."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def batch(b: int = 5, d: int = 8, dt: int = 12) -> tuple[torch.Tensor, ...]:
    """A student batch and a teacher batch of another dimension, with positives near their queries."""
    query, teacher_query = unit(b, d, seed=0), unit(b, dt, seed=1)
    positive = F.normalize(query + 0.7 * unit(b, d, seed=2), dim=-1)
    teacher_positive = F.normalize(teacher_query + 0.7 * unit(b, dt, seed=3), dim=-1)
    return query, positive, teacher_query, teacher_positive


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive(query, positive, teacher_query, teacher_positive, temperature, teacher_temperature) -> float:
    """Row by row: KL(teacher || student) over all positives of the batch, averaged over the queries."""
    total = 0.0
    for i in range(query.shape[0]):
        student = softmax([float(query[i] @ p) / temperature for p in positive])
        teacher = softmax([float(teacher_query[i] @ p) / teacher_temperature for p in teacher_positive])
        total += sum(t * math.log(t / s) for t, s in zip(teacher, student, strict=True))
    return total / query.shape[0]


def test_hand_computed_two_by_two():
    # Student: identity similarities. Teacher: query 0 is closer to positive 1 (0.8) than to its own (0.6).
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positive = query.clone()
    teacher_query = query.clone()
    teacher_positive = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    loss = similarity_kl(query, positive, teacher_query, teacher_positive, temperature=1.0)

    # Row 0: student logits [1, 0], teacher logits [0.6, 0.8]; row 1: [0, 1] and [0.8, 0.6] (the mirror image).
    s = [math.e / (math.e + 1), 1 / (math.e + 1)]
    t = [math.exp(0.6) / (math.exp(0.6) + math.exp(0.8)), math.exp(0.8) / (math.exp(0.6) + math.exp(0.8))]
    row = t[0] * math.log(t[0] / s[0]) + t[1] * math.log(t[1] / s[1])
    assert loss.item() == pytest.approx(row, rel=1e-12)  # both rows give the same KL, so the mean is one row's
    assert row > 0


def test_zero_when_the_teacher_is_the_student():
    query, positive, _, _ = batch()
    loss = similarity_kl(query, positive, query, positive, temperature=0.05)
    assert abs(loss.item()) < 1e-12


def test_zero_when_other_temperatures_give_the_same_scaled_similarities():
    query, positive, _, _ = batch()
    # Teacher vectors with two extra orthogonal components: unit norm, and teacher . = 0.5 * student similarity.
    # At teacher_temperature 0.05 and temperature 0.1 the scaled similarities are then identical.
    b = query.shape[0]
    side = math.sqrt(0.5)
    zeros, ones = torch.zeros(b, 1, dtype=query.dtype), torch.full((b, 1), side, dtype=query.dtype)
    teacher_query = torch.cat([side * query, ones, zeros], dim=1)  # [B, D + 2]
    teacher_positive = torch.cat([side * positive, zeros, ones], dim=1)  # [B, D + 2]
    assert torch.allclose(teacher_query.norm(dim=1), torch.ones(b, dtype=query.dtype))
    loss = similarity_kl(query, positive, teacher_query, teacher_positive, temperature=0.1, teacher_temperature=0.05)
    assert abs(loss.item()) < 1e-12
    # The same teacher at the student's temperature is a different (flatter) target.
    assert similarity_kl(query, positive, teacher_query, teacher_positive, temperature=0.1).item() > 1e-3


@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(0.02, None), (0.05, 0.2), (1.0, 0.1)])
def test_matches_naive_loop(temperature, teacher_temperature):
    query, positive, teacher_query, teacher_positive = batch()
    loss = similarity_kl(
        query,
        positive,
        teacher_query,
        teacher_positive,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
    )
    expected_teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    expected = naive(query, positive, teacher_query, teacher_positive, temperature, expected_teacher_temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert loss.item() > 0


def test_gather_in_one_process_is_the_local_loss():
    query, positive, teacher_query, teacher_positive = batch()
    gathered = similarity_kl(query, positive, teacher_query, teacher_positive, gather=True)
    local = similarity_kl(query, positive, teacher_query, teacher_positive, gather=False)
    assert gathered.item() == pytest.approx(local.item(), rel=1e-12)


def test_gradients_reach_the_student_not_the_teacher():
    query, positive, teacher_query, teacher_positive = (t.clone().requires_grad_(True) for t in batch())
    loss = similarity_kl(query, positive, teacher_query, teacher_positive, temperature=0.05)
    loss.backward()
    assert query.grad is not None and positive.grad is not None
    # Every positive is a candidate of every query, so every row of both gets a gradient.
    assert (query.grad.norm(dim=1) > 0).all()
    assert (positive.grad.norm(dim=1) > 0).all()
    assert teacher_query.grad is None and teacher_positive.grad is None


def test_gradient_matches_finite_differences():
    query, positive, teacher_query, teacher_positive = batch(b=3, d=4, dt=5)
    query.requires_grad_(True)
    positive.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, p: similarity_kl(q, p, teacher_query, teacher_positive, temperature=0.3), (query, positive)
    )


def test_bfloat16_student_gets_a_float32_loss_and_bfloat16_gradients():
    query, positive, teacher_query, teacher_positive = (t.float() for t in batch())
    reference = similarity_kl(query, positive, teacher_query, teacher_positive, temperature=0.05)
    query16 = query.to(torch.bfloat16).requires_grad_(True)
    loss = similarity_kl(query16, positive.to(torch.bfloat16), teacher_query.half(), teacher_positive, temperature=0.05)
    loss.backward()
    assert loss.dtype == torch.float32
    assert query16.grad is not None and query16.grad.dtype == torch.bfloat16
    # Only the inputs' rounding to bfloat16 separates the two.
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((4, 8), (4, 7), (4, 12), (4, 12)), r"query \(4, 8\) and positive \(4, 7\)"),
        (((4, 8), (4, 8), (4, 12), (3, 12)), r"teacher_query \(4, 12\) and teacher_positive \(3, 12\)"),
        (((4, 8), (4, 8), (3, 12), (3, 12)), r"query \(4, 8\) and teacher_query \(3, 12\)"),
        (((8,), (8,), (4, 12), (4, 12)), r"query \(8,\) and positive \(8,\)"),
    ],
)
def test_shape_mismatch_names_the_shapes(shapes, message):
    tensors = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        similarity_kl(*tensors)


@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(0.0, None), (-0.1, 0.1), (0.1, 0.0), (0.1, -1.0)])
def test_non_positive_temperatures_are_refused(temperature, teacher_temperature):
    query, positive, teacher_query, teacher_positive = batch()
    with pytest.raises(ValueError, match="positive temperatures"):
        similarity_kl(
            query,
            positive,
            teacher_query,
            teacher_positive,
            temperature=temperature,
            teacher_temperature=teacher_temperature,
        )
