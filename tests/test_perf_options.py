"""Speed options (config `perf`, engine/precision.py, engine/allocator.py, fused AdamW): what each one switches."""

from __future__ import annotations

import os

import pytest
import torch

from conddetr.config import ConfigError, load_config
from conddetr.engine import allocator, precision
from conddetr.engine.optim import build_optimizer


def test_perf_section_defaults_and_overrides():
    cfg = load_config(None, [])
    assert (cfg.perf.fused_backbone, cfg.perf.compile, cfg.perf.tf32, cfg.perf.tune_malloc) == (
        True, False, False, True
    )  # fmt: skip
    cfg = load_config(None, ["perf.compile=true", "perf.fused_backbone=false"])
    assert cfg.perf.compile and not cfg.perf.fused_backbone
    with pytest.raises(ConfigError, match="perf.compile"):
        load_config(None, ["perf.compile=fast"])


def test_autocast_dtype_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="running in float32"):
        assert precision.autocast_dtype("bf16", cpu) is None
    assert precision.autocast_dtype("bf16", cuda) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert precision.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert precision.autocast_dtype("fp16", cpu) is torch.float16
    assert precision.autocast_dtype("none", cuda) is None
    with pytest.raises(ValueError, match="optim.amp"):
        precision.autocast_dtype("bfloat16", cpu)


def test_tf32_switches_only_cuda():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        precision.set_tf32(True, torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        precision.set_tf32(True, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_compile_wraps_and_keeps_the_plain_module():
    module = torch.nn.Linear(2, 2)
    assert precision.maybe_compile(module, False) is module
    compiled = precision.maybe_compile(module, True)  # compiles lazily, at its first call
    assert compiled is not module and compiled._orig_mod is module
    assert list(compiled._orig_mod.state_dict()) == ["weight", "bias"]  # checkpoints save this one: no prefix


def test_tune_malloc_applies_and_exports(monkeypatch):
    for var in allocator.SETTINGS:
        monkeypatch.delenv(var, raising=False)
    if allocator._libc() is None:
        assert allocator.tune_malloc() is False
        return
    assert allocator.tune_malloc() is True
    assert {v: int(os.environ[v]) for v in allocator.SETTINGS} == allocator.SETTINGS
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # a user's own value wins
    assert allocator.tune_malloc() is True and os.environ["MALLOC_MMAP_THRESHOLD_"] == "65536"


def test_adamw_is_fused_where_torch_has_the_kernel():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    optimizer = build_optimizer(model, lr=1e-3, lr_backbone=0.0, weight_decay=1e-4)
    assert optimizer.defaults["fused"] is True
    twin = torch.nn.Sequential(torch.nn.Linear(3, 3))
    twin.load_state_dict(model.state_dict())
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=1e-4, foreach=False)
    for m, opt in ((model, optimizer), (twin, reference)):
        for _ in range(3):
            m(torch.ones(2, 3)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(model[0].weight, twin[0].weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 30, 64), (5,)])
def test_lean_relu_dropout_equals_autograd_bit_for_bit(shape):
    """FFN ReLU + dropout saving less for the backward: same output, gradient and random stream."""
    from conddetr.models.transformer import relu_dropout

    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        out = relu_dropout(x, 0.1, training=True) if lean else torch.nn.functional.dropout(x.relu(), 0.1, True)
        assert (type(out.grad_fn).__name__ == "_ReluDropoutBackward") == lean
        out.backward(grad)
        results.append((out.detach(), x.grad, torch.rand(3)))
        x.grad = None
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _graph_names(node, depth: int = 4) -> set[str]:
    if node is None or depth == 0:
        return set()
    return {type(node).__name__}.union(*(_graph_names(n, depth - 1) for n, _ in node.next_functions))


@pytest.mark.parametrize("widths,masked", [((32, 32), True), ((64, 32), True), ((32, 32), False)])
def test_lean_attention_equals_attend_in_training(widths, masked):
    """attend's lean CPU training kernel (kernel "auto", conddetr/attention.py): the SDPA kernel's outputs, gradients
    and random stream, with equal and Conditional-DETR-like unequal q/k and v widths."""
    from conddetr.attention import attend

    gen = torch.Generator().manual_seed(0)
    d_qk, d_v = widths
    sdpa = "sdpa" if d_qk == d_v else "sdpa_padded"  # what "auto" picks outside training
    q = torch.randn(2, 7, d_qk, generator=gen, requires_grad=True)
    k = torch.randn(2, 9, d_qk, generator=gen, requires_grad=True)
    v = torch.randn(2, 9, d_v, generator=gen, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = masked
    grad = torch.randn(2, 7, d_v, generator=gen)
    results = []
    for kernel in (sdpa, "auto"):
        torch.manual_seed(1)
        out = attend(q, k, v, 4, mask, 0.3, kernel)
        assert ("_LeanAttentionBackward" in _graph_names(out.grad_fn)) == (kernel == "auto")
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad, torch.rand(3)))
        q.grad = k.grad = v.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: SDPA itself
        torch.testing.assert_close(attend(q, k, v, 4, mask, 0.0), attend(q, k, v, 4, mask, 0.0, sdpa), rtol=0, atol=0)
