"""The one scratch-buffer cache, and the memory its users hold."""

from __future__ import annotations

import torch

from grail.trainer.analysis.core.scratch import ScratchBuffers
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.core.stats import CPU_CHUNK, StreamingStats, chunk_numel


def test_views_of_the_size_asked_from_one_buffer_per_key() -> None:
    scratch = ScratchBuffers()
    a = scratch.get("cpu", 10)
    assert a.shape == (10,) and a.dtype == torch.float32 and a.device.type == "cpu"
    smaller = scratch.get(torch.device("cpu"), 4)
    assert smaller.data_ptr() == a.data_ptr() and smaller.shape == (4,)  # reused
    other_slot = scratch.get("cpu", 10, slot="b")
    other_dtype = scratch.get("cpu", 10, torch.int32)
    ptrs = {a.data_ptr(), other_slot.data_ptr(), other_dtype.data_ptr()}
    assert len(ptrs) == 3 and other_dtype.dtype == torch.int32
    assert len(scratch) == 3 and scratch.nbytes() == 3 * 10 * 4


def test_buffers_grow_to_the_largest_size_asked_and_no_further() -> None:
    scratch = ScratchBuffers()
    scratch.get("cpu", 100)
    scratch.get("cpu", 30)
    assert scratch.nbytes() == 100 * 4
    big = scratch.get("cpu", 250)
    assert big.shape == (250,) and scratch.nbytes() == 250 * 4  # the old buffer is dropped
    scratch.get("cpu", 8, torch.uint8, slot="raw")
    assert scratch.nbytes() == 250 * 4 + 8


def test_minimum_size_per_device() -> None:
    seen = []

    def floor(device: torch.device) -> int:
        seen.append(device)
        return 64

    scratch = ScratchBuffers(floor)
    first = scratch.get("cpu", 3)
    assert scratch.nbytes() == 64 * 4 and seen == [torch.device("cpu")]
    assert scratch.get("cpu", 64).data_ptr() == first.data_ptr()  # no reallocation up to 64
    assert ScratchBuffers(16).get("cpu", 20).shape == (20,)
    fixed = ScratchBuffers(16)
    fixed.get("cpu", 2, torch.int16)
    assert fixed.nbytes() == 16 * 2  # the floor counts elements of the dtype asked


def test_clear_drops_every_buffer_but_handed_out_views_stay_valid() -> None:
    scratch = ScratchBuffers()
    view = scratch.get("cpu", 5)
    view.fill_(2.0)
    scratch.clear()
    assert scratch.nbytes() == 0 and len(scratch) == 0
    assert view.sum() == 10.0
    assert scratch.get("cpu", 5).data_ptr() != view.data_ptr()  # a fresh buffer


def test_streaming_statistics_hold_chunk_sized_scratch_only() -> None:
    x = torch.randn(3 * CPU_CHUNK + 5)
    stats = StreamingStats([0.5])
    stats.update(x)
    # ax, tmp (float32) and the int32 buffer: one chunk each, never the tensor's size
    assert stats._scratch.nbytes() == 3 * 4 * chunk_numel(x.device)


def test_parameter_change_holds_no_scratch_between_measurements() -> None:
    from grail.trainer.analysis.metrics import ParameterChangeMetrics

    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    old = ParameterSnapshot(model, dtype=torch.float32)  # lossy: every eager buffer is used
    with torch.no_grad():
        model.weight.add_(1.0)
    delta = old.compute_delta(ParameterSnapshot.live(model))
    metric = ParameterChangeMetrics(fused=False, track_sign_flips=True)
    assert metric.compute(delta=delta)["param_change/num_params"] == 64 * 64 + 64
    assert metric._scratch.nbytes() == 0
    assert delta._scratch.nbytes() == 4 * chunk_numel(torch.device("cpu"))  # one float32 chunk


def test_adam_sign_holds_no_scratch_between_measurements() -> None:
    from grail.trainer.analysis.metrics.adam_sign import AdamSignDescentMetrics
    from grail.trainer.analysis.metrics.base import AnalysisContext

    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    metric = AdamSignDescentMetrics(fused=False)
    assert metric.compute(context=AnalysisContext(model=model, optimizer=opt))
    assert metric._scratch.nbytes() == 0
