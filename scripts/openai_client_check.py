"""Talks to `qmtot serve` on 127.0.0.1:PORT with the official openai client (see
scripts/test-openai-client). Exits non-zero on the first failed check."""

import sys
import time
import urllib.request

import openai

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"
for _ in range(600):  # the server loads the model first
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the server did not come up")

client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0)
messages = [{"role": "user", "content": "What is the capital of France?"}]

models = client.models.list()
assert len(models.data) == 1, models

chat = client.chat.completions.create(model="qmtot", messages=messages, max_tokens=12, temperature=0)
text = chat.choices[0].message.content
assert "Paris" in text, text
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, chat.usage

stream = client.chat.completions.create(model="qmtot", messages=messages, max_tokens=12, temperature=0, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert streamed == text, (streamed, text)

comp = client.completions.create(model="qmtot", prompt="The capital of France is", max_tokens=8, temperature=0)
stream = client.completions.create(
    model="qmtot", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
)
assert "".join(c.choices[0].text for c in stream) == comp.choices[0].text, comp

four = client.chat.completions.create(
    model="qmtot", messages=messages, max_tokens=8, temperature=0.9, n=4, seed=1
)
assert len(four.choices) == 4 and sorted(c.index for c in four.choices) == [0, 1, 2, 3], four

try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    sys.exit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
try:
    client.completions.create(model="qmtot", prompt="word " * 9000, max_tokens=4)
    sys.exit("an over-long prompt was accepted")
except openai.BadRequestError as e:
    assert "context" in str(e), e

print(f"openai {openai.__version__} client: chat, completions, streaming, n=4, errors: ok")
