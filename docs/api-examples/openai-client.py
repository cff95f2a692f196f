from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:9990/v1", api_key="not-needed")
stream = client.chat.completions.create(
    model="dllama",  # any name: the server answers with the model it has loaded
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=32,
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
