from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
stream = client.chat.completions.create(
    model="smollm2", stream=True, max_tokens=256, temperature=0,
    messages=[{"role": "user", "content": "Is 91 a prime number? Think step by step "
               "inside <think> </think>, then answer Yes or No."}],
    extra_body={"probe": {"choices": ["Yes", "No"], "every": 16,
                          "stop_when": {"threshold": 0.9, "consecutive": 2}}})
for chunk in stream:
    for c in chunk.choices:
        print(c.delta.content or "", end="", flush=True)
        for r in (c.model_extra or {}).get("probe_readings") or []:
            print(f"\n[t={r['token_index']} P(Yes)={r['probs']['Yes']:.2f} mass={r['mass']:.2f}]")
