# on the running server: train "calm" from one persona pair and register it
curl -s http://127.0.0.1:8000/v1/steering/vectors/train -H 'Content-Type: application/json' \
    -d '{"name": "calm", "personas": [["calm", "anxious"]], "suffixes": "chat",
         "max_suffixes": 64, "layers": "4:26"}'
# offline, from a recipe file (HF transformers on the default model)
vllm-steer extract configs/vectors/happy.yaml --out happy.safetensors
