"""The collective report reads what a compiled program exchanges from its HLO text."""

import pytest

from keras_vmoe.distribution import collective_report

# Lines as XLA prints them (JAX 0.10 on CPU: Shardy's mesh-style replica
# groups), plus the older explicit and iota spellings and GPU's async starts.
HLO = """
HloModule jit_step, entry_computation_layout={(f32[8,32]{1,0})->f32[8,32]{1,0}}

ENTRY %main.1 (param: f32[8,32]) -> f32[8,32] {
  %all-to-all.2 = (f32[1,2,4,32]{3,2,1,0}, f32[1,2,4,32]{3,2,1,0}, f32[1,2,4,32]{3,2,1,0}, f32[1,2,4,32]{3,2,1,0}) all-to-all(%a, %b, %c, %d), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_3'=4] {'axis_3'}, dimensions={0}, metadata={op_name="jit(step)/moe/transpose"}
  %all-gather = f32[1,4,1,16,32]{4,3,2,0,1} all-gather(%x), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_1'}, dimensions={1}, use_global_device_ids=true
  %all-reduce.1 = f32[] all-reduce(%r), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1], device_ids=([2,4]T(1,0)) {'axis_1'}, use_global_device_ids=true, to_apply=%region_0
  ROOT %all-reduce.2 = (f32[], bf16[16,32]{1,0}) all-reduce(%s, %t), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %reduce-scatter.1 = f32[4,32]{1,0} reduce-scatter(%u), channel_id=4, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %all-gather-start = (f32[2,32]{1,0}, f32[8,32]{1,0}) all-gather-start(%v), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather-done = f32[8,32]{1,0} all-gather-done(%all-gather-start)
  %collective-permute = f32[8,32]{1,0} collective-permute(%w), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %add.3 = f32[8,32]{1,0} add(%p, %q)
}
"""


def test_counts_shapes_group_sizes_and_bytes():
    report = collective_report(HLO)
    assert report.counts() == {
        "all-to-all": 1,
        "all-gather": 2,
        "all-reduce": 2,
        "reduce-scatter": 1,
        "collective-permute": 1,
    }
    all_to_all = report.of_kind("all-to-all")[0]
    assert all_to_all.shapes == [(1, 2, 4, 32)] * 4
    assert all_to_all.group_size == 4  # The mesh axis named in braces.
    assert all_to_all.buffer_bytes == 4 * 2 * 4 * 32 * 4
    assert all_to_all.sent_bytes == all_to_all.buffer_bytes * 3 // 4
    assert all_to_all.op_name == "jit(step)/moe/transpose"
    gather, gather_start = report.of_kind("all-gather")
    assert (gather.shapes, gather.group_size, gather.buffer_bytes) == ([(1, 4, 1, 16, 32)], 4, 8192)
    # The async start counts its result (not its operand) once; the done is not counted.
    assert (gather_start.shapes, gather_start.group_size) == ([(8, 32)], 4)
    scalar, mixed = report.of_kind("all-reduce")
    assert (scalar.group_size, scalar.buffer_bytes) == (2, 4)  # device_ids + {'axis_1'}
    assert (mixed.group_size, mixed.buffer_bytes) == (8, 4 + 16 * 32 * 2)  # f32 + bf16
    assert mixed.sent_bytes == 2 * mixed.buffer_bytes * 7 // 8
    scatter = report.of_kind("reduce-scatter")[0]
    assert (scatter.group_size, scatter.sent_bytes) == (4, 3 * 4 * 32 * 4)
    assert report.of_kind("collective-permute")[0].sent_bytes == 8 * 32 * 4


def test_totals_table_and_gathered_shapes():
    report = collective_report(HLO)
    assert report.buffer_bytes()["all-gather"] == 8192 + 8 * 32 * 4
    assert report.total_sent_bytes() == sum(c.sent_bytes for c in report.collectives)
    assert report.gathers_shape((8, 32)) and not report.gathers_shape((8, 16, 32))
    table = report.table()
    assert "| all-to-all | 1 | 4,096 | 3,072 |" in table
    assert table.splitlines()[-1].startswith("| total | 7 |")
    assert "all-to-all=1" in repr(report)


def test_a_program_without_collectives_and_bad_input():
    report = collective_report("ENTRY %main { ROOT %add = f32[2]{0} add(%a, %b) }")
    assert report.collectives == [] and report.total_sent_bytes() == 0
    with pytest.raises(ValueError, match="HLO text of a compiled program"):
        collective_report(b"bytes")
