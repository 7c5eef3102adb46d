from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
def ask(**kw):
    r = client.chat.completions.create(model="smollm2", max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "Tell me about your day."}], **kw)
    return r.choices[0].message.content
print("plain:", ask())
print("happy:", ask(extra_body={"steering": {"vectors": [{"name": "happy", "scale": 4.0}],
                                             "apply_to": "generated"}}))
