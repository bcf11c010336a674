"""lance_model/runtime: where the weights live and how one call runs: the session, loading, devices and the GPU seam,
memory estimates, the VRAM plan, streamed weights, interrupts, the stores kept across runs, the token-by-token
decode step."""
