"""The self-check (``vllm-steer doctor --verify``) and its stamp, which the version policy
(``vllm_steer.compat``) reads: ``stamp`` (keys, files), ``verify`` (tiny models steered
through the installed vLLM), ``reference`` (the independent HF reference), ``tokenizer``."""
