VLLM_CPU_KVCACHE_SPACE=2 vllm-steer serve --served-model-name smollm2 --port 8000 \
    --enforce-eager --gpu-memory-utilization 0.5 --max-model-len 2048
