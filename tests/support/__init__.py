"""What the tests share: tiny reference pipelines and models (tiny.py), checkpoint and LoRA files
written in the published layouts (ldm_keys.py, lora_files.py), mutated files for the readers
(fuzz_files.py), a CUDA-graph stand-in for the CPU (graph_stand_in.py), misbehaving bench
runners (bench_fakes.py), the one comparison helper (compare.py), k-diffusion driven as A1111
drives it (kdiffusion_reference.py), `sdengine serve` in this process (server.py) and
schemathesis' image strategy for its schema (schemathesis_hooks.py).

Tests import them as `support.<module>`: pytest puts tests/ on sys.path (rootdir-relative
"prepend" import mode, no tests/__init__.py)."""
