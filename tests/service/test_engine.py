"""The batching engine in-process on the tiny checkpoint: what batching must never change (a job's images),
what it must guarantee (bounded batches, first come first served, no starvation, per-job cancel and failure),
with a sink that records what the worker would have written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.bound import likelihood, rd_grid
from model.inference import InferenceOptions, default_options
from model.latents import interpolate, reconstruct
from service.engine import Engine, JobRejected, JobSpec, Measurement, ServedModel, StepProgress


@dataclass
class RecordingSink:
    """Records every call; ``cancel`` holds the ids whose cancellation is asked for."""

    cancel: set[str] = field(default_factory=set)
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, job id), in call order
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    frames: dict[str, list[int]] = field(default_factory=dict)
    progress: list[StepProgress] = field(default_factory=list)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    measurements: dict[str, Measurement] = field(default_factory=dict)

    def sync(self, progress: Sequence[StepProgress], active: Sequence[str]) -> set[str]:
        self.progress.extend(progress)
        return self.cancel & set(active)

    def frame(self, job_id: str, step: int, t: int, x0_hat: torch.Tensor) -> None:
        self.frames.setdefault(job_id, []).append(step)

    def succeeded(self, job_id: str, images: torch.Tensor, last: StepProgress) -> None:
        self.events.append(("succeeded", job_id))
        self.images[job_id] = images.clone()

    def measured(self, job_id: str, measurement: Measurement, last: StepProgress) -> None:
        self.events.append(("measured", job_id))
        self.measurements[job_id] = measurement

    def canceled(self, job_id: str) -> None:
        self.events.append(("canceled", job_id))

    def failed(self, job_id: str, code: str, message: str) -> None:
        self.events.append(("failed", job_id))
        self.errors[job_id] = (code, message)

    def handed_back(self, job_id: str, reason: str) -> None:
        self.events.append(("handed_back", job_id))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> ServedModel:
    return ServedModel.load("tiny", str(tiny_checkpoint), "cpu", batch_invariant=True)


def spec(job_id: str, **kw: object) -> JobSpec:
    fields: dict[str, object] = {"model": "tiny", "num_images": 1, "seed": 0, "steps": 10, "preview_every": 0}
    fields.update(kw)
    return JobSpec(job_id=job_id, **fields)  # type: ignore[arg-type]


def run(engine: Engine, max_ticks: int = 1000) -> list[int]:
    """Tick until idle; returns the images in each tick's forward."""
    sizes = []
    while not engine.idle and len(sizes) < max_ticks:
        sizes.append(engine.tick().images)
    return sizes


def test_a_jobs_images_are_identical_alone_or_batched_with_others(tiny: ServedModel) -> None:
    alone = RecordingSink()
    engine = Engine({"tiny": tiny}, alone)
    engine.add(spec("a", seed=5, steps=12))
    run(engine)

    batched = RecordingSink()
    engine = Engine({"tiny": tiny}, batched, max_batch_size=16)
    engine.add(spec("b", num_images=3, seed=9, steps=40, sampler="ddim", eta=0.5))
    engine.tick()
    engine.tick()  # "a" joins mid-way through "b", and "c" after it: every tick has a different mix
    engine.add(spec("a", seed=5, steps=12))
    engine.tick()
    engine.add(spec("c", num_images=2, seed=1, steps=20, variance="fixedsmall"))
    sizes = run(engine)
    assert max(sizes) == 6 and min(sizes) < 6  # "a" ran in batches of several sizes
    assert torch.equal(batched.images["a"], alone.images["a"])  # bit for bit


def test_image_i_is_the_same_whatever_num_images(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink)
    engine.add(spec("one", seed=3, num_images=1))
    engine.add(spec("four", seed=3, num_images=4))
    run(engine)
    assert torch.equal(sink.images["four"][:1], sink.images["one"])
    assert not torch.equal(sink.images["four"][1], sink.images["four"][0])


def test_batches_are_bounded_and_first_come_first_served(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink, max_batch_size=4)
    engine.add(spec("first", num_images=3, steps=6))
    engine.add(spec("second", num_images=2, steps=3))  # doesn't fit beside "first": waits
    engine.add(spec("third", num_images=1, steps=3))  # fits in the space left
    sizes = run(engine)
    assert max(sizes) <= 4
    assert [job for kind, job in sink.events] == ["third", "first", "second"]
    assert sizes == [4, 4, 4, 3, 3, 3, 2, 2, 2]


def test_a_job_larger_than_the_batch_runs_alone(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink, max_batch_size=2)
    engine.add(spec("big", num_images=3, steps=2))
    engine.add(spec("small", num_images=1, steps=2))
    assert run(engine) == [3, 3, 1, 1]


def test_a_short_job_behind_a_long_one_finishes_first(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink, max_batch_size=8)
    engine.add(spec("long", num_images=4, steps=40))
    engine.tick()
    engine.add(spec("short", num_images=1, steps=5))
    run(engine)
    assert [job for _, job in sink.events] == ["short", "long"]


def test_cancel_stops_a_job_within_one_step_and_spares_the_others(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink)
    engine.add(spec("stay", steps=6))
    engine.add(spec("go", steps=6))
    engine.tick()
    sink.cancel.add("go")
    engine.tick()  # "go" steps once more, then the sync after the step reports the cancel
    assert engine.job_ids == ["stay"]
    run(engine)
    assert sink.events == [("canceled", "go"), ("succeeded", "stay")]
    assert max(p.step for p in sink.progress if p.job_id == "go") <= 2


def test_frames_at_preview_steps_and_the_last(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink, progress_interval=3600)
    engine.add(spec("p", steps=10, preview_every=4))
    engine.add(spec("last-only", steps=5, preview_every=0))
    run(engine)
    assert sink.frames == {"p": [1, 5, 9, 10], "last-only": [5]}
    # throttled progress still lands on every preview step (the last one goes with the images)
    assert [p.step for p in sink.progress if p.job_id == "p"] == [1, 5, 9]


def test_requests_the_model_cannot_serve_are_rejected(tiny: ServedModel) -> None:
    engine = Engine({"tiny": tiny}, RecordingSink())
    with pytest.raises(JobRejected, match=r"T=40, so steps must be 1\.\.40") as err:
        engine.add(spec("x", steps=41))
    assert err.value.code == "invalid_request"
    with pytest.raises(JobRejected, match="serves \\['tiny'\\]"):
        engine.add(spec("y", model="cifar10"))
    with pytest.raises(JobRejected, match="sampler"):
        engine.add(spec("z", sampler="euler"))
    with pytest.raises(JobRejected, match="malformed"):
        JobSpec.from_request("w", "tiny", {"num_images": "two", "seed": 1, "steps": 3})
    assert engine.idle


def test_unknown_option_names_are_rejected_at_admission_for_every_kind(tiny: ServedModel) -> None:
    """The model's chains are the one check of sampler and variance names: their refusal is the job's."""
    engine = Engine({"tiny": tiny}, RecordingSink())
    for bad in (spec("g", variance="huge"), spec("r", start_t=4, steps=4, inputs=on_grid(1, 0), sampler="euler"),
                spec("i", kind="interpolate", num_images=2, steps=4, t=4, lambdas=(0.0, 1.0), inputs=on_grid(2, 0),
                     variance="huge"),
                spec("l", kind="likelihood", num_images=1, steps=40, inputs=on_grid(1, 0), variance="huge")):
        with pytest.raises(JobRejected, match="one of") as err:
            engine.add(bad)
        assert err.value.code == "invalid_request"
    assert engine.idle


def test_a_failing_forward_fails_its_jobs_and_the_engine_goes_on(tiny: ServedModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink)
    engine.add(spec("doomed", steps=3))

    def broken(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tiny, "forward", broken)
    engine.tick()
    monkeypatch.undo()
    assert sink.events == [("failed", "doomed")]
    code, message = sink.errors["doomed"]
    assert code == "internal" and "out of memory" in message and "fewer images" in message
    engine.add(spec("fine", steps=3))
    run(engine)
    assert sink.events[-1] == ("succeeded", "fine")


def test_hand_back_all_empties_the_engine(tiny: ServedModel) -> None:
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink)
    engine.add(spec("a"))
    engine.add(spec("b"))
    engine.tick()
    assert engine.hand_back_all("stopping") == ["a", "b"]
    assert engine.idle and sink.events == [("handed_back", "a"), ("handed_back", "b")]


# ---- the fast inference path (model.inference) through the engine -------------------------------------------
@pytest.mark.parametrize("options", [InferenceOptions(precision="bf16"),
                                     InferenceOptions(precision="bf16", channels_last=True),
                                     InferenceOptions(channels_last=True)], ids=lambda o: o.describe())
def test_batch_invariance_holds_with_bf16_and_channels_last_on_the_cpu(tiny_checkpoint: Path,
                                                                        options: InferenceOptions) -> None:
    model = ServedModel.load("tiny", str(tiny_checkpoint), "cpu", batch_invariant=True, options=options)
    assert model.options == options
    alone = RecordingSink()
    engine = Engine({"tiny": model}, alone)
    engine.add(spec("a", seed=5, steps=12))
    run(engine)

    batched = RecordingSink()
    engine = Engine({"tiny": model}, batched, max_batch_size=16)
    engine.add(spec("b", num_images=3, seed=9, steps=20))
    engine.tick()
    engine.add(spec("a", seed=5, steps=12))
    engine.add(spec("c", num_images=5, seed=1, steps=4))
    sizes = run(engine)
    assert len(set(sizes)) > 1  # "a" ran in batches of several sizes
    assert torch.equal(batched.images["a"], alone.images["a"])  # bit for bit, as with fp32


def test_served_model_defaults_to_the_devices_default_options(tiny: ServedModel) -> None:
    assert tiny.options == default_options("cpu")
    assert tiny.options.describe() in ("fp32", "bf16")  # bf16 where the CPU has bf16 instructions


def test_worker_inference_flags_override_env_which_overrides_the_device_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service.settings import Settings
    from service.settings import settings_from_args as from_args
    from service.worker import SETTINGS_FLAGS, configure_parser, inference_options

    def settings_from_args(args: argparse.Namespace) -> Settings:
        return from_args(args, SETTINGS_FLAGS)

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    cpu = torch.device("cpu")
    assert inference_options(settings_from_args(parser.parse_args([])), cpu) == default_options(cpu)
    monkeypatch.setenv("DDPM_PRECISION", "bf16")
    monkeypatch.setenv("DDPM_CHANNELS_LAST", "true")
    from_env = inference_options(settings_from_args(parser.parse_args([])), cpu)
    assert (from_env.precision, from_env.channels_last) == ("bf16", True)
    args = parser.parse_args(["--precision", "fp32", "--no-channels-last", "--cuda-graphs", "--max-batch-size", "8"])
    chosen = inference_options(settings_from_args(args), cpu)
    assert (chosen.precision, chosen.channels_last, chosen.max_batch_size) == ("fp32", False, 8)
    assert chosen.cuda_graphs is False  # asked for, but this is not a CUDA device


def test_the_worker_reports_its_inference_options_in_the_heartbeat_info(redis_url: str, tiny_checkpoint: Path
                                                                        ) -> None:
    from service import metrics
    from service.settings import Settings
    from service.worker import Worker

    settings = Settings(redis_url=redis_url, checkpoints={"tiny": str(tiny_checkpoint)}, precision="bf16",
                        channels_last=True, device="cpu")
    worker = Worker(settings, name="options-test")
    try:
        worker.load()
        assert worker.models["tiny"].options.describe() == "bf16+channels_last"
        assert worker.info()["inference"] == {"precision": "bf16", "channels_last": True, "compile": False,
                                              "cuda_graphs": False}
    finally:
        worker.lanes.close()
        metrics.WORKER_MODEL_LOADED.set(0)  # this process is not a worker


def test_one_setting_times_the_workers_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    """DDPM_WORKER_LEASE_SECONDS (``--lease-seconds`` on top) sets the heartbeat's lifetime and interval (a
    third), every claimed job's lease and how long a stopping worker's last writes wait for the store."""
    import argparse

    from service.settings import Settings
    from service.settings import settings_from_args as from_args
    from service.worker import SETTINGS_FLAGS, Worker, configure_parser

    def settings_from_args(args: argparse.Namespace) -> Settings:
        return from_args(args, SETTINGS_FLAGS)

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert settings_from_args(parser.parse_args([])).worker_lease_seconds == 15
    monkeypatch.setenv("DDPM_WORKER_LEASE_SECONDS", "9")
    worker = Worker(settings_from_args(parser.parse_args([])), name="lease-test", device="cpu")
    try:
        assert (worker.lease, worker.beat_every, worker.session.lease) == (9, 3.0, 9)
    finally:
        worker.lanes.close()
    assert settings_from_args(parser.parse_args(["--lease-seconds", "6"])).worker_lease_seconds == 6
    with pytest.raises(ValidationError, match="worker_lease_seconds"):
        settings_from_args(parser.parse_args(["--lease-seconds", "1"]))


# ---- the paper's other operations as jobs (model.latents, model.bound) ------------------------------------------
@pytest.fixture(scope="module")
def tiny_fp32(tiny_checkpoint: Path) -> ServedModel:
    return ServedModel.load("tiny", str(tiny_checkpoint), "cpu", batch_invariant=True,
                            options=InferenceOptions(precision="fp32"))


def on_grid(n: int, seed: int) -> torch.Tensor:
    """n pictures (n, 3, 8, 8) on the 8-bit grid in [-1, 1], as the worker reads stored inputs."""
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed)).float() / 127.5 - 1.0


def test_a_likelihood_job_shares_ticks_with_generation_and_equals_model_bound(tiny_fp32: ServedModel) -> None:
    x0 = on_grid(2, 0)
    alone = RecordingSink()
    engine = Engine({"tiny": tiny_fp32}, alone)
    engine.add(spec("l", kind="likelihood", num_images=2, steps=40, seed=7, inputs=x0, rd_points=5))
    assert run(engine) == [2] * 40  # T terms, one forward each

    shared = RecordingSink()
    engine = Engine({"tiny": tiny_fp32}, shared)
    engine.add(spec("g", num_images=2, steps=40, seed=1))
    engine.add(spec("l", kind="likelihood", num_images=2, steps=40, seed=7, inputs=x0, rd_points=5))
    for _ in range(5):
        engine.tick()
    engine.add(spec("h", num_images=1, steps=10, seed=2, sampler="ddim"))
    sizes = [4] * 5 + run(engine)
    assert len(sizes) == 40 and max(sizes) == 5  # one forward per tick for every kind of job
    assert ("measured", "l") in shared.events and ("succeeded", "g") in shared.events
    got, want = shared.measurements["l"].likelihood, alone.measurements["l"].likelihood
    assert torch.equal(got.terms, want.terms) and torch.equal(got.mse, want.mse)  # batching changes nothing
    with torch.inference_mode():
        direct = likelihood(tiny_fp32.forward, tiny_fp32.diffusion, x0, seed=7)  # the same network calls
        plain = likelihood(tiny_fp32.unet, tiny_fp32.diffusion, x0, seed=7)  # the unprepared fp32 U-Net
    assert torch.equal(got.bits_per_dim, direct.bits_per_dim)
    torch.testing.assert_close(got.bits_per_dim, plain.bits_per_dim, rtol=1e-5, atol=0)
    result = shared.measurements["l"].as_dict()
    assert result["precision"] == "fp32" and [p["t"] for p in result["rate_distortion"]] == rd_grid(40, 5)
    assert len(result["terms"][0]) == 41 and result["bits_per_dim"] == [float(v) for v in got.bits_per_dim.double()]


def test_reconstruction_and_interpolation_jobs_are_model_latents(tiny: ServedModel) -> None:
    x0 = on_grid(2, 1)
    sink = RecordingSink()
    engine = Engine({"tiny": tiny}, sink)
    engine.add(spec("vary", num_images=3, steps=6, seed=4, start_t=12, inputs=x0[:1], sampler="ddim", eta=0.5))
    engine.add(spec("same", num_images=2, steps=5, seed=4, start_t=5, shared_latent=True, inputs=x0[1:]))
    engine.add(spec("mix", kind="interpolate", num_images=3, steps=8, seed=6, t=8, lambdas=(0.0, 0.3, 1.0),
                    inputs=x0))
    run(engine)
    with torch.inference_mode():
        vary = reconstruct(tiny.forward, tiny.diffusion, x0[:1], start_t=12, seed=4, num_images=3, steps=6,
                           sampler="ddim", eta=0.5)
        same = reconstruct(tiny.forward, tiny.diffusion, x0[1:], start_t=5, seed=4, num_images=2, steps=5,
                           shared_latent=True)
        mix = interpolate(tiny.forward, tiny.diffusion, x0[:1], x0[1:], [0.0, 0.3, 1.0], t=8, seed=6, steps=8)
    assert torch.equal(sink.images["vary"], vary)
    assert torch.equal(sink.images["same"], same)
    assert torch.equal(sink.images["mix"], mix)


def test_jobs_without_their_pictures_are_rejected(tiny: ServedModel) -> None:
    engine = Engine({"tiny": tiny}, RecordingSink())
    for bad in (spec("a", kind="likelihood", num_images=2, steps=40, inputs=on_grid(1, 0)),
                spec("b", kind="interpolate", num_images=2, steps=4, t=4, lambdas=(0.0, 1.0)),
                spec("c", start_t=4, steps=4, inputs=torch.zeros(1, 1, 8, 8))):
        with pytest.raises(JobRejected, match="input picture"):
            engine.add(bad)
    with pytest.raises(JobRejected, match=r"steps must be 1\.\.4"):
        engine.add(spec("d", start_t=4, steps=5, inputs=on_grid(1, 0)))
    with pytest.raises(JobRejected, match="8-bit grid"):
        engine.add(spec("e", kind="likelihood", num_images=1, steps=40, inputs=on_grid(1, 0) * 0.5 + 1e-3))
    with pytest.raises(JobRejected, match="malformed"):
        JobSpec.from_request("f", "tiny", {"num_images": 1, "seed": 1, "steps": 3}, kind="upscale")
    assert engine.idle
