"""Generation: the jitted prefill + decode loop (`decode`), the weights it reads (`rollout_weights`,
`layer_copies`), the host-side `sampler`, and next-token distributions (`processors`)."""

from sdft_jax.sampling.sampler import SampleOutput, Sampler, SampleResult, SamplingConfig, sample

__all__ = ["SampleOutput", "SampleResult", "Sampler", "SamplingConfig", "sample"]
