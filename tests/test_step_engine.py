"""The training step engines (:mod:`taemi.train.step`) on the CPU: the captured-step path with
its eager stand-in (shape bookkeeping, static buffers, limits, learning-rate tensors), and
whole runs with it and with batches resident on the device, against the plain path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import NO_DROPOUT as NO_RANDOM_DROPS

from taemi.config import ConfigError
from taemi.data.batch import Batch, padded_length
from taemi.data.dataset import ClipDataset
from taemi.train import step as step_engine
from taemi.train.modes import build_model
from taemi.train.schedule import make_scheduler
from taemi.train.state import load_state
from taemi.train.trainer import make_optimizer, train

NO_DROPOUT = (*NO_RANDOM_DROPS, "train.patience=0")


def test_padded_length_rounds_up_to_the_quantum() -> None:
    assert [padded_length(t, 8) for t in (0, 1, 8, 9, 17)] == [8, 8, 8, 16, 24]
    assert padded_length(0) == 1  # a missing modality is one step of its token
    with pytest.raises(ValueError, match="quantum"):
        padded_length(5, 0)


def _batches(store, cfg, ids_sets) -> list[Batch]:
    ds = ClipDataset(store, store.ids, np.random.rand(len(store), 6), length_quantum=8)
    return [ds.collator()([ds[i] for i in ids]) for ids in ids_sets]


def _engine(cfg, store, max_shapes=8):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = make_optimizer(cfg, model, capturable=True)
    scheduler = make_scheduler(optimizer, 2, 20)
    engine = step_engine.GraphedStep.build(
        model, optimizer, cfg, torch.device("cpu"), "fp32", store.dims, max_shapes
    )
    return engine, model, optimizer, scheduler


def _step_both(*engines_and_schedules, batch: Batch) -> list[torch.Tensor]:
    """One optimiser step of each (engine, schedule) pair on ``batch``: -> their losses."""
    losses = []
    for engine, schedule in engines_and_schedules:
        losses.append(engine.compute([batch], len(batch)))
        engine.update()
        schedule.step()
    return losses


def test_graphed_step_captures_a_shape_on_its_second_step(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT, "data.length_quantum=8")
    engine, _model, _optimizer, _scheduler = _engine(cfg, store)
    a, _b = _batches(store, cfg, [[0, 1, 2], [3, 4, 5]])
    losses = [engine.compute([a], 3) for _ in range(3)]
    assert engine.counts == {"replays": 2, "eager_steps": 1, "captures": 1, "over_limit_steps": 0}
    assert all(x.shape == (1,) and torch.isfinite(x).all() for x in losses)
    assert losses[2].item() < losses[0].item()  # three AdamW steps on one batch fit it

    # the graph reads static views: every shape's views start at the buffers' first element
    graph = next(iter(engine.graphs.values()))
    assert graph.inputs.audio.data_ptr() == engine.static.buffers["audio"].data_ptr()
    assert torch.equal(graph.inputs.audio, a.audio) and torch.equal(graph.inputs.target, a.target)
    stats = engine.stats()
    assert stats["engine"] == "graphed" and stats["capture"] == "eager_stand_in"
    assert stats["shapes"] == 1 and stats["failed"] is None


def test_captured_steps_equal_eager_steps(store, tiny_config) -> None:
    """Replaying (static buffers, zero_grad keeping the tensors, tensor learning rates) is the
    same optimisation as the recipe's eager step."""
    cfg = tiny_config(*NO_DROPOUT, "data.length_quantum=8")
    batches = _batches(store, cfg, [[0, 1, 2], [3, 4], [0, 1, 2], [5, 6, 7], [3, 4]])
    engine, model, optimizer, scheduler = _engine(cfg, store)

    torch.manual_seed(0)
    ref = build_model(cfg).train()
    ref_opt = make_optimizer(cfg, ref, capturable=True)  # bias corrections on the device too
    ref_sched = make_scheduler(ref_opt, 2, 20)
    eager = step_engine.EagerStep(
        ref,
        ref,
        ref_opt,
        torch.amp.GradScaler("cpu", enabled=False),
        cfg,
        torch.device("cpu"),
        "fp32",
    )
    for batch in batches:
        got, want = _step_both((engine, scheduler), (eager, ref_sched), batch=batch)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert engine.counts["replays"] == 2  # batches 3 and 5 repeat a shape
    # the key biases (a self-attention's k part of qkv.bias, a cross-attention's ln_kv.bias)
    # shift every score of a query equally: the softmax ignores them, their gradients are
    # rounding noise, and AdamW turns noise into lr-sized steps of either sign
    invariant = ("self_attention.qkv.bias", "ln_kv.bias")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if not name.endswith(invariant):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batches[0]), ref(batches[0]), rtol=1e-5, atol=1e-6)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(ref_sched.get_last_lr()[0])


def test_shapes_over_the_limit_run_eagerly(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT, "data.length_quantum=1")
    engine, *_ = _engine(cfg, store, max_shapes=1)
    a, b = _batches(store, cfg, [[0, 1], [2, 3, 4]])  # two batch sizes: two shapes
    for batch in (a, a, b, b, b, a):
        engine.compute([batch], len(batch))
    # a: eager, captured + replayed, replayed; b: eager, then over the limit twice (eager too)
    assert engine.counts == {"replays": 2, "eager_steps": 4, "captures": 1, "over_limit_steps": 2}


def test_a_schedule_that_assigns_a_float_still_reaches_the_captured_rate(
    store, tiny_config
) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    engine, _model, optimizer, _scheduler = _engine(cfg, store)
    rate = optimizer.param_groups[0]["lr"]
    (batch,) = _batches(store, cfg, [[0, 1]])
    optimizer.param_groups[0]["lr"] = 0.25  # what an older torch's scheduler does
    engine.compute([batch], 2)
    assert optimizer.param_groups[0]["lr"] is rate and float(rate) == 0.25


def test_static_buffers_refuse_a_batch_beyond_the_length_caps(store, tiny_config) -> None:
    cfg = tiny_config("data.max_audio_len=4", "data.length_quantum=2")
    static = step_engine.StaticInputs.for_config(cfg, store.dims, torch.device("cpu"))
    (batch,) = _batches(store, tiny_config(), [list(range(cfg.train.batch_size))])
    assert batch.audio.shape[1] > 4  # the store's clips are longer than the cap
    with pytest.raises(ValueError, match="larger than the static buffer"):
        static.load(batch)


def test_static_buffers_keep_their_dtype(store, tiny_config) -> None:
    """A buffer the graphs read is never replaced: another dtype is refused."""
    cfg = tiny_config()
    static = step_engine.StaticInputs.for_config(cfg, store.dims, torch.device("cpu"))
    (batch,) = _batches(store, cfg, [[0, 1]])
    static.load(batch)
    buffer = static.buffers["audio"]
    batch.audio = batch.audio.double()
    with pytest.raises(ValueError, match="its static buffer torch.float32"):
        static.load(batch)
    assert static.buffers["audio"] is buffer


def test_a_failed_capture_is_said_and_the_run_goes_on_eagerly(store, tiny_config, caplog) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    engine, *_ = _engine(cfg, store)

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.capturer.capture = broken
    (batch,) = _batches(store, cfg, [[0, 1]])
    for _ in range(3):
        assert torch.isfinite(engine.compute([batch], 2)).all()
    assert engine.counts["eager_steps"] == 3 and engine.counts["captures"] == 0
    assert "not permitted" in engine.stats()["failed"]
    assert "capturing the training step in a CUDA graph failed" in caplog.text


# --------------------------------------------------------------------------- whole runs


def test_captured_resident_run_matches_the_plain_run(tmp_path, store, labels, tiny_config) -> None:
    """train.cuda_graphs=on (the eager stand-in here) with batches resident on the device and
    padded to a quantum gives the plain run's losses and metrics; metrics.json says how it ran;
    state.pt holds plain learning rates and resumes with the plain engine."""
    sets = (*NO_DROPOUT, "train.max_epochs=2", "data.batching=bucket")
    plain = train(tiny_config(*sets), store, *labels, tmp_path / "plain", progress=False)
    fast_cfg = tiny_config(
        *sets, "train.cuda_graphs=on", "data.resident=yes", "data.length_quantum=16"
    )
    fast = train(fast_cfg, store, *labels, tmp_path / "fast", progress=False)
    for a, b in zip(plain.history, fast.history):
        for key in ("train_loss", "valid_loss", "valid_mean_pearson", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    ex = json.loads((tmp_path / "fast" / "metrics.json").read_text())["execution"]
    assert ex["step"]["engine"] == "graphed" and ex["step"]["capture"] == "eager_stand_in"
    assert ex["step"]["replays"] > 0 and ex["step"]["captures"] == ex["step"]["shapes"] > 0
    assert ex["batches"] == "resident on the device" and ex["resident_bytes"] > 0
    assert ex["length_quantum"] == 16 and 0 < ex["padding_share"] < 1
    assert ex["startup_seconds"] > 0
    plain_ex = json.loads((tmp_path / "plain" / "metrics.json").read_text())["execution"]
    assert plain_ex["step"] == {"engine": "eager"} and plain_ex["batches"] == "DataLoader"
    assert plain_ex["padding_share"] < ex["padding_share"]  # the quantum pads more

    st = load_state(tmp_path / "fast" / "state.pt")
    assert all(isinstance(g["lr"], float) for g in st["optimizer"]["param_groups"])

    class Stop(BaseException):
        pass

    def stop(epoch: int, row: dict) -> None:
        raise Stop

    with pytest.raises(Stop):  # interrupted after epoch 1 of the captured, resident run
        train(fast_cfg, store, *labels, tmp_path / "cut", progress=False, callbacks=[stop])
    resumed = train(  # resumed with the plain engine and DataLoader batches
        tiny_config(*sets), store, *labels, tmp_path / "cut", resume=True, progress=False
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[1]["valid_mean_pearson"] == pytest.approx(
        plain.history[1]["valid_mean_pearson"], rel=1e-4
    )
    assert math.isfinite(resumed.history[1]["train_loss"])


@pytest.mark.slow
def test_compiled_captured_run_matches_the_plain_run(tmp_path, store, labels, tiny_config):
    """train.compile with captured steps (the eager stand-in here): the captured forward and
    backward are compiled (dynamic shapes, the weights precast in bf16) and give the plain
    bf16 run's losses within the rounding that fused kernels change."""
    sets = (*NO_DROPOUT, "train.max_epochs=2", "data.batching=bucket", "train.precision=bf16")
    plain = train(tiny_config(*sets), store, *labels, tmp_path / "plain", progress=False)
    fast_cfg = tiny_config(*sets, "train.cuda_graphs=on", "train.compile=true")
    fast = train(fast_cfg, store, *labels, tmp_path / "fast", progress=False)
    for a, b in zip(plain.history, fast.history):
        for key in ("train_loss", "valid_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-2), key
        assert b["valid_mean_pearson"] == pytest.approx(a["valid_mean_pearson"], abs=2e-2)
    assert fast.history[1]["train_loss"] < fast.history[0]["train_loss"]  # it learns
    ex = json.loads((tmp_path / "fast" / "metrics.json").read_text())["execution"]
    step = ex["step"]
    assert step["engine"] == "graphed" and step["compiled"] is True and step["replays"] > 0
    assert step["precast_parameters"] > 0 and step["failed"] is None


def test_cuda_graphs_on_refuses_what_it_cannot_capture(tmp_path, store, labels, tiny_config):
    with pytest.raises(ConfigError, match="gradient accumulation"):
        train(
            tiny_config("train.cuda_graphs=on", "train.grad_accum_steps=2"),
            store,
            *labels,
            tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run").exists()  # refused before the folder was touched


def test_resident_yes_refuses_splits_that_do_not_fit(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    from taemi.train import trainer

    monkeypatch.setattr(trainer, "memory_available", lambda device: 1000)
    with pytest.raises(ConfigError, match="data.resident=yes: the splits' features take"):
        train(tiny_config("data.resident=yes"), store, *labels, tmp_path / "run", progress=False)


def test_captured_fp16_steps_scale_the_loss_as_the_eager_step(store, tiny_config) -> None:
    """fp16: the grad scaler's cycle runs inside the captured step (on the device): the same
    skipped updates on overflow, the same scale backed off and grown, and the same
    optimisation as the recipe's eager step with its scaler."""
    cfg = tiny_config(*NO_DROPOUT, "data.length_quantum=8")
    batches = _batches(store, cfg, [[0, 1, 2], [3, 4], [0, 1, 2], [5, 6, 7], [3, 4]] * 4)
    cpu = torch.device("cpu")

    def scaler():  # overflows fp16 gradients at first, then grows back every 2 good steps
        return torch.amp.GradScaler("cpu", init_scale=2.0**19, growth_interval=2)

    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = make_optimizer(cfg, model, capturable=True)
    scheduler = make_scheduler(optimizer, 2, 20)
    graphed_scaler = scaler()
    engine = step_engine.GraphedStep.build(
        model, optimizer, cfg, cpu, "fp16", store.dims, 8, scaler=graphed_scaler
    )
    torch.manual_seed(0)
    ref = build_model(cfg).train()
    ref_opt = make_optimizer(cfg, ref, capturable=True)
    ref_sched = make_scheduler(ref_opt, 2, 20)
    eager_scaler = scaler()
    eager = step_engine.EagerStep(ref, ref, ref_opt, eager_scaler, cfg, cpu, "fp16", precast=True)

    scales = [graphed_scaler.get_scale()]
    skipped = grown = 0
    for i, batch in enumerate(batches):
        before = [p.detach().clone() for p in model.parameters()]
        got, want = _step_both((engine, scheduler), (eager, ref_sched), batch=batch)
        assert got.item() == pytest.approx(want.item(), rel=1e-3, abs=1e-6)
        assert graphed_scaler.get_scale() == eager_scaler.get_scale(), i
        scales.append(graphed_scaler.get_scale())
        if scales[-1] < scales[-2]:  # an overflow: the update was skipped, nothing moved
            skipped += 1
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), i
        grown += scales[-1] > scales[-2]
    assert skipped >= 2 and grown >= 1, scales
    assert engine.counts["replays"] > 0
    assert engine.stats()["loss_scaling"] is True
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if not name.endswith(("self_attention.qkv.bias", "ln_kv.bias")):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


def test_a_captured_fp16_step_needs_its_scaler_and_fused_adamw(store, tiny_config) -> None:
    cfg = tiny_config(*NO_DROPOUT)
    model = build_model(cfg)
    fused = make_optimizer(cfg, model, capturable=True)
    with pytest.raises(ValueError, match="enabled grad scaler"):
        step_engine.GraphedStep.build(model, fused, cfg, torch.device("cpu"), "fp16", store.dims, 8)
    plain = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="needs fused AdamW"):
        step_engine.GraphedStep.build(
            model,
            plain,
            cfg,
            torch.device("cpu"),
            "fp16",
            store.dims,
            8,
            scaler=torch.amp.GradScaler("cpu"),
        )


def test_a_failed_fp16_capture_leaves_the_scaler_ready(store, tiny_config, monkeypatch) -> None:
    """A capture that stops after the scaler unscaled the gradients must not leave it
    refusing the next step ("unscale_() has already been called")."""
    cfg = tiny_config(*NO_DROPOUT)
    model = build_model(cfg).train()
    engine = step_engine.GraphedStep.build(
        model,
        make_optimizer(cfg, model, capturable=True),
        cfg,
        torch.device("cpu"),
        "fp16",
        store.dims,
        8,
        scaler=torch.amp.GradScaler("cpu"),
    )

    def broken(fn):
        def fail(*args):
            raise RuntimeError("operation not permitted when stream is capturing")

        with monkeypatch.context() as m:
            m.setattr(step_engine, "clip_gradients", fail)  # after unscale_, before update
            return fn()

    engine.capturer.capture = broken
    (batch,) = _batches(store, cfg, [[0, 1]])
    for _ in range(3):
        assert torch.isfinite(engine.compute([batch], 2)).all()
    assert engine.counts["eager_steps"] == 3 and "not permitted" in engine.stats()["failed"]


def test_captured_fp16_run_matches_the_eager_fp16_run(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    """A whole fp16 run (fp16 is CUDA's; forced here) captured with its loss scaling gives
    the eager fp16 run's losses and metrics, and saves the scale it reached in state.pt."""
    from taemi.train import trainer

    monkeypatch.setattr(trainer, "resolve_precision", lambda name, device: "fp16")
    sets = (*NO_DROPOUT, "train.max_epochs=2", "data.batching=bucket", "data.length_quantum=16")
    eager = train(tiny_config(*sets), store, *labels, tmp_path / "eager", progress=False)
    fast = train(
        tiny_config(*sets, "train.cuda_graphs=on"),
        store,
        *labels,
        tmp_path / "fast",
        progress=False,
    )
    for a, b in zip(eager.history, fast.history):
        for key in ("train_loss", "valid_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
        assert b["valid_mean_pearson"] == pytest.approx(a["valid_mean_pearson"], abs=1e-3)
    step = json.loads((tmp_path / "fast" / "metrics.json").read_text())["execution"]["step"]
    assert step["engine"] == "graphed" and step["loss_scaling"] is True
    assert step["replays"] > 0 and step["precast_dtype"] == "float16"
    scales = [
        load_state(tmp_path / run / "state.pt")["scaler"]["scale"] for run in ("eager", "fast")
    ]
    assert scales[0] == scales[1]
