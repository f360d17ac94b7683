"""Collectives read from HLO text: counts, bytes, and executions multiplied by the loops' trip counts,
on hand-written XLA:CPU- and TPU-style modules whose figures are counted by hand."""

from sdft_jax.bench.hlo_collectives import collectives, shape_bytes

HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %w = bf16[1,8]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[4,8]{1,0} all-gather(bf16[1,8]{1,0} %w), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %ag)
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (x: f32[16], w: bf16[4,8]) -> f32[16] {
  %x = f32[16]{0} parameter(0)
  %loop = (s32[], bf16[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"36"}}
  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %x), to_apply=%add
  %ard = f32[16]{0} all-reduce-done((f32[16]{0}, f32[16]{0}) %ars)
  ROOT %cp = f32[16]{0} collective-permute(f32[16]{0} %ard), source_target_pairs={{0,1},{1,0}}
}
"""


def test_collectives_count_loop_iterations_and_async_pairs_once():
    found = collectives(HLO)
    assert found == {
        "all-gather": {"count": 1, "bytes": 64, "executed": 36, "executed_bytes": 36 * 64},
        "all-reduce": {"count": 1, "bytes": 64, "executed": 1, "executed_bytes": 64},
        "collective-permute": {"count": 1, "bytes": 64, "executed": 1, "executed_bytes": 64},
    }
    assert shape_bytes("(bf16[2,3]{1,0}, s32[], pred[5])") == 12 + 4 + 5


# A TPU program's loops: no known trip count, a condition `counter < constant`; an async
# collective-permute whose result tuple ends in two u32[] contexts.
TPU_HLO = """HloModule step

%windowed_cond (p: (bf16[2,8], u32[])) -> pred[] {
  %four = u32[]{:T(128)} constant(4)
  %p = (bf16[2,8], u32[]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=1
  ROOT %lt = pred[]{:T(512)} compare(%i, %four), direction=LT
}

%windowed_body (p: (bf16[2,8], u32[])) -> (bf16[2,8], u32[]) {
  %p = (bf16[2,8], u32[]) parameter(0)
  %x = bf16[2,8]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=0
  %cps = (bf16[2,8]{1,0}, bf16[2,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[2,8]{1,0} collective-permute-done(%cps)
  ROOT %t = (bf16[2,8], u32[]) tuple(%cpd, %i)
}

%layers_cond (p: (s32[], bf16[2,8])) -> pred[] {
  %n = s32[]{:T(128)} constant(36)
  %p = (s32[], bf16[2,8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%layers_body (p: (s32[], bf16[2,8])) -> (s32[], bf16[2,8]) {
  %p = (s32[], bf16[2,8]) parameter(0)
  %w = (bf16[2,8], u32[]) while(%init), condition=%windowed_cond, body=%windowed_body
  ROOT %t = (s32[], bf16[2,8]) tuple(%i, %x)
}

ENTRY %main (x: bf16[2,8]) -> bf16[2,8] {
  %x = bf16[2,8]{1,0} parameter(0)
  %loop = (s32[], bf16[2,8]) while(%init), condition=%layers_cond, body=%layers_body
  ROOT %r = bf16[2,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_of_a_tpu_program_count_loops_by_their_conditions():
    # 36 layers x 4 windows; each permute moves one bf16[2,8] (32 bytes), not its contexts.
    assert collectives(TPU_HLO) == {
        "collective-permute": {"count": 1, "bytes": 32, "executed": 144, "executed_bytes": 144 * 32}}
