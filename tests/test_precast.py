"""Mixed precision with the weights cast once per step (:mod:`taemi.train.precast`): which
parameters are precast, that the gradients are autocast's, that a step casts no weight and
adds into no gradient, and that the step engines and a whole run use it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import NO_DROPOUT as NO_RANDOM_DROPS
from torch.utils._python_dispatch import TorchDispatchMode

from taemi.data.dataset import ClipDataset
from taemi.runtime import autocast
from taemi.train import step as step_engine
from taemi.train.modes import build_model
from taemi.train.precast import PrecastWeights, precast_names
from taemi.train.schedule import make_scheduler
from taemi.train.trainer import make_optimizer, train

CPU = torch.device("cpu")
NO_DROPOUT = (*NO_RANDOM_DROPS, "train.patience=0")


def _batch(store, ids, missing_audio=False):
    ds = ClipDataset(store, store.ids, np.random.RandomState(0).rand(len(store), 6))
    batch = ds.collator()([ds[i] for i in ids])
    if missing_audio:  # the audio token takes the first clip's place
        batch.missing[0, 0] = True
    return batch


class ParameterCasts(TorchDispatchMode):
    """Counts casts that read a parameter's storage, and in-place adds/zeroing of gradients."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.grads = {
            p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None
        }
        self.casts = self.grad_adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        ptr = first.untyped_storage().data_ptr() if first is not None else None
        if func is torch.ops.aten._to_copy.default and ptr in self.params:
            self.casts += 1
        if func.overloadpacket in (torch.ops.aten.add_, torch.ops.aten.zero_) and ptr in self.grads:
            self.grad_adds += 1
        return func(*args, **(kwargs or {}))


def test_precast_parameters_are_those_autocast_only_casts(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    model = build_model(cfg).train()
    names = precast_names(model, _batch(store, [0, 1, 2]), CPU, torch.bfloat16)
    assert model.training  # restored after the probe's evaluation-mode pass
    linears = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        for p in ("weight", "bias")
    }
    # the cross-attention's value bias is scaled by the attention mass in float32, the layer
    # norms run in float32, the text token is substituted by torch.where: none is precast
    assert set(names) == (linears - {"ca_audio.v_proj.bias", "ca_vision.v_proj.bias"}) | {
        "missing.audio",
        "missing.vision",
    }
    assert names == [n for n, _ in model.named_parameters() if n in set(names)]  # model order


def _autocast_and_precast(cfg, store):
    """Two copies of one model, one bf16 step's forward and backward each: ``ref`` under
    autocast (``.backward()``), ``model`` with precast weights; asserts the outputs are
    bit-identical. -> (ref, model, weights)."""
    batch = _batch(store, [0, 1, 2, 3], missing_audio=True)
    torch.manual_seed(0)
    ref = build_model(cfg).train()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with autocast(CPU, "bf16"):
        want = ref(batch)
    torch.nn.functional.mse_loss(want.float(), batch.target).backward()
    weights = PrecastWeights.for_model(model, batch, CPU, "bf16")
    with autocast(CPU, "bf16"):
        got = weights.forward(batch)
    assert torch.equal(got, want)
    weights.backward(torch.nn.functional.mse_loss(got.float(), batch.target))
    return ref, model, weights


def test_precast_gradients_are_autocasts(store, tiny_config) -> None:
    """The same forward values and the same gradients as autocast's per-use casts: equal for
    every parameter used once, within bf16 rounding for the projections used twice (features
    and missing token: their two gradients are summed in bf16 instead of float32)."""
    ref, model, weights = _autocast_and_precast(tiny_config(*NO_DROPOUT), store)
    assert weights.stats()["precast_dtype"] == "bfloat16"
    twice = ("enc_audio.proj.", "enc_vision.proj.")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        if name.startswith(twice):
            torch.testing.assert_close(p.grad, q.grad, rtol=2**-7, atol=1e-6, msg=name)
        else:
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize(
    "variant",
    [
        ("model.align=false",),  # the release: cross-attention on raw features
        ("model.fusion=self_attention",),
        ("model.fusion=concat",),
        ("model.anchor=audio",),
        ("model.anchor=vision", "model.missing_tokens=zeros"),
    ],
    ids=["official-form", "self-attention", "concat", "audio-anchor", "vision-anchor-zeros"],
)
def test_every_variant_trains_with_autocasts_values(store, tiny_config, variant) -> None:
    """The probe decides per model: for every ablation variant the precast forward equals
    autocast's and the gradients agree within bf16 rounding (equal for the products used
    once)."""
    ref, model, weights = _autocast_and_precast(tiny_config(*NO_DROPOUT, *variant), store)
    exact = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:  # not in this variant's graph: autograd.grad gives zeros
            assert not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=2**-7, atol=1e-6, msg=name)
        exact += torch.equal(p.grad, q.grad)
    assert weights.copies and exact >= len(weights.copies) // 2


def test_backward_writes_over_or_adds_into_the_same_gradient_tensors(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    batch = _batch(store, [0, 1, 2])
    model = build_model(cfg).train()
    weights = PrecastWeights.for_model(model, batch, CPU, "bf16")

    def loss():
        with autocast(CPU, "bf16"):
            return torch.nn.functional.mse_loss(weights.forward(batch).float(), batch.target)

    weights.backward(loss())
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    ptrs = {n: p.grad.data_ptr() for n, p in model.named_parameters()}
    weights.backward(loss())  # written over: the same values, the same tensors
    for n, p in model.named_parameters():
        assert p.grad.data_ptr() == ptrs[n] and torch.equal(p.grad, first[n]), n
    weights.backward(loss(), accumulate=True)  # a second micro-batch: added
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], msg=n)


def test_the_copies_leave_the_model_after_each_forward(store, tiny_config, monkeypatch):
    """The copies sit in the modules' parameter slots only during a forward pass, a failing
    one included: the model keeps its own float32 parameters for saving and validation."""
    cfg = tiny_config(*NO_DROPOUT)
    batch = _batch(store, [0, 1])
    model = build_model(cfg).train()
    before = dict(model.named_parameters())
    weights = PrecastWeights.for_model(model, batch, CPU, "bf16")
    seen = {}

    def spy(self, x):  # the audio projection, inside the forward
        seen["weight"] = self.weight
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(type(model.enc_audio.proj), "forward", spy)
    with autocast(CPU, "bf16"):
        weights.forward(batch)
    assert seen["weight"].dtype == torch.bfloat16  # the copy, during the call
    after = dict(model.named_parameters())  # the same Parameter objects after
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)

    def boom(self, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(model.enc_audio.proj), "forward", boom)
    with pytest.raises(RuntimeError, match="boom"), autocast(CPU, "bf16"):
        weights.forward(batch)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


def test_fp32_or_off_precasts_nothing(store, tiny_config) -> None:
    cfg = tiny_config()
    batch = _batch(store, [0, 1])
    model = build_model(cfg).train()
    for weights in (
        PrecastWeights.for_model(model, batch, CPU, "fp32"),
        PrecastWeights.for_model(model, batch, CPU, "bf16", precast=False),
    ):
        assert weights.copies == [] and weights.stats()["precast_parameters"] == 0
        assert len(weights.others) == len(list(model.parameters()))


def _graphed(cfg, precision):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = make_optimizer(cfg, model, capturable=True)
    make_scheduler(optimizer, 2, 20)
    engine = step_engine.GraphedStep.build(
        model, optimizer, cfg, CPU, precision, {"audio": 12, "vision": 10, "text": 8}, 8
    )
    return engine, model


def test_a_captured_bf16_step_casts_no_weight_and_adds_into_no_gradient(store, tiny_config):
    """What the captured step records: one multi-tensor refresh instead of a cast per weight
    and use, gradients written over instead of zeroed and added into."""
    cfg = tiny_config(*NO_DROPOUT, "data.length_quantum=8")
    ds = ClipDataset(store, store.ids, np.random.rand(len(store), 6), length_quantum=8)
    batch = ds.collator()([ds[i] for i in (0, 1, 2)])
    counts = {}
    for precast in (True, False):
        engine, model = _graphed(
            tiny_config(*NO_DROPOUT, "data.length_quantum=8", f"train.precast_weights={precast}"),
            "bf16",
        )
        engine.compute([batch], 3)  # the eager first step: probe, gradients, optimiser state
        watch = ParameterCasts(model)
        with watch:
            engine.compute([batch], 3)  # the capture (the stand-in runs the step)
        assert watch.grad_adds == 0
        counts[precast] = (watch.casts, engine.stats()["precast_parameters"])
    assert counts[True][0] == 0 and counts[True][1] > 0
    # autocast casts every one of those parameters in the forward pass, twice for those used
    # twice (and casts their gradients back, which reads no parameter)
    assert counts[False][1] == 0 and counts[False][0] > counts[True][1]
    assert cfg.train.precast_weights  # on by default


def test_eager_step_precasts_in_one_process_only(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    batch = _batch(store, [0, 1, 2])
    model = build_model(cfg).train()
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    one = step_engine.EagerStep(model, model, optimizer, scaler, cfg, CPU, "bf16", precast=True)
    one.compute([batch], 3)
    one.update()
    assert one.stats()["engine"] == "eager" and one.stats()["precast_parameters"] > 0
    for precision, world, precast in (("bf16", 2, True), ("fp32", 1, True), ("bf16", 1, False)):
        other = step_engine.EagerStep(
            model, model, optimizer, scaler, cfg, CPU, precision, world, precast=precast
        )
        assert not other.precast_wanted
    wrapped = torch.nn.Sequential(model)  # a wrapper (DDP, torch.compile) is not the model
    assert not step_engine.EagerStep(
        model, wrapped, optimizer, scaler, cfg, CPU, "bf16", precast=True
    ).precast_wanted


def test_a_bf16_run_precast_matches_autocast_per_use(tmp_path, store, labels, tiny_config):
    """A whole bf16 run (grad accumulation included) with and without precast weights: the
    same losses and metrics within bf16 rounding; metrics.json says which ran."""
    sets = (*NO_DROPOUT, "train.max_epochs=2", "train.precision=bf16", "train.grad_accum_steps=2")
    runs = {
        flag: train(
            tiny_config(*sets, f"train.precast_weights={flag}"),
            store,
            *labels,
            tmp_path / str(flag),
            progress=False,
        )
        for flag in (True, False)
    }
    for a, b in zip(runs[False].history, runs[True].history):
        for key in ("train_loss", "valid_loss", "valid_mean_pearson"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    ex = json.loads((tmp_path / "True" / "metrics.json").read_text())["execution"]
    assert ex["step"]["engine"] == "eager" and ex["step"]["precast_parameters"] > 0
    ex = json.loads((tmp_path / "False" / "metrics.json").read_text())["execution"]
    assert "precast_parameters" not in ex["step"]
