"""What is live at a compiled program's peak, read from XLA's dump: a program whose arguments are its
largest buffers, and a dump directory written by hand."""

import jax
import jax.numpy as jnp

from sdft_jax.bench.peak_buffers import compile_with_peak_buffers, read_peak_buffers


def test_the_arguments_of_a_small_program_are_live_at_its_peak():
    f = jax.jit(lambda a, b: (jnp.tanh(a @ b) @ b.T).sum(axis=0))
    compiled, peak = compile_with_peak_buffers(f.lower(jnp.ones((256, 1024)), jnp.ones((1024, 512))), top=2)
    # Both arguments are read until the last matmul: live at the peak, the two largest shapes.
    assert peak["by_shape"] == [{"shape": "f32[1024,512]", "count": 1, "bytes": 1024 * 512 * 4},
                                {"shape": "f32[256,1024]", "count": 1, "bytes": 256 * 1024 * 4}]
    m = compiled.memory_analysis()
    assert 3 * 2**20 <= peak["live_bytes"] <= (m.argument_size_in_bytes + m.output_size_in_bytes
                                               + m.temp_size_in_bytes)


def test_a_dump_is_read_by_shape_and_a_dump_without_live_ranges_gives_none(tmp_path):
    (tmp_path / "module_0001.jit_step.after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 64, parameter 0:\n"
        " value: <3 param.1 @0> (size=64,offset=0): bf16[4,8]{1,0}\n"
        " value: <4 fusion.2 @0> (size=64,offset=0): bf16[4,8]{1,0:T(8,128)(2,1)}\n"
        " value: <5 tuple.3{} @0> (size=16,offset=0): (f32[2]{0}, f32[2]{0})\n"
        " value: <6 dot.4 @0> (size=256,offset=0): f32[8,8]{1,0}\n")
    (tmp_path / "module_0001.jit_step.after_optimizations-live-range.txt").write_text(
        "HloLiveRange (max 9):\n  BufferLiveRange:\n    param.1{}:0-9\n"
        "  Live ranges at 5 (peak):\n"
        "    dot.4{}: 256 bytes (cumulative: 256 bytes)\n"
        "    param.1{}: 64 bytes (cumulative: 320 bytes)\n"
        "    fusion.2{}: 64 bytes (cumulative: 384 bytes)\n"
        "    tuple.3{}: 16 bytes (cumulative: 400 bytes)\n"
        "    while.7{2}: 8 bytes (cumulative: 408 bytes)\n"
        "  Stack trace breakdown for peak usage: 408 bytes\n")
    assert read_peak_buffers(str(tmp_path), top=2) == {
        "live_bytes": 408, "buffers": 5,
        "by_shape": [{"shape": "f32[8,8]", "count": 1, "bytes": 256}, {"shape": "bf16[4,8]", "count": 2, "bytes": 128}]}
    assert read_peak_buffers(str(tmp_path), top=5)["by_shape"][2:] == [{"shape": "other", "count": 2, "bytes": 24}]
    (tmp_path / "module_0001.jit_step.after_optimizations-live-range.txt").unlink()
    assert read_peak_buffers(str(tmp_path), top=2) is None
