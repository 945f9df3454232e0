"""serve.py through the real `openai` client over real HTTP: serve.py runs as a subprocess on 127.0.0.1 on a free
port. Completions and chat, streamed and not, equal what LLM gives; stop strings, usage, logprobs, error shapes and
status codes, the API key; a client that disconnects frees its slots; N concurrent greedy requests equal each
request alone (a tiny model here, the real SmolLM2-135M-Instruct in the slow test)."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from generate import LLM
from test_engine import PROMPTS, tiny_checkpoint, tiny_llama

ROOT = Path(__file__).parent
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *args):
        self.port = free_port()
        self.model = str(checkpoint)
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), self.model, "--port",
                                         str(self.port), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while True:
            try:
                self.health()
                return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"serve.py did not start: {self.process.stderr.read()}")
                time.sleep(0.3)

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    def health(self) -> dict:
        with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
            return json.loads(r.read())

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=key, max_retries=0, timeout=120)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def tiny_512(smollm2_hf_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, 512-token context."""
    def make():
        model = tiny_llama()
        model.config.max_position_embeddings = 512
        return model
    return tiny_checkpoint(make, smollm2_hf_dir, tmp_path_factory.mktemp("serve"))[1]


@pytest.fixture(scope="module")
def server(tiny_512):
    s = Server(tiny_512, "--max_batch_size", "4", "--api_key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(tiny_512):
    return LLM.load(tiny_512, device="cpu")


def chat(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------------------------
# What it answers


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [server.model]
    assert server.health()["status"] == "ok"


def test_completion_equals_llm_with_usage(server, llm):
    r = server.client().completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert r.choices[0].text == llm.generate([PROMPTS[1]], max_new_tokens=12, temperature=0)[0]
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    n = len(llm.tokenizer.encode(PROMPTS[1]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 12, n + 12)


def test_chat_streamed_equals_chat_not_streamed(server, llm):
    kwargs = dict(model=server.model, messages=chat("Tell me a story."), max_completion_tokens=10, temperature=0)
    whole = server.client().chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == llm.chat([chat("Tell me a story.")], max_new_tokens=10,
                                                        temperature=0)[0]
    chunks = list(server.client().chat.completions.create(**kwargs, stream=True,
                                                          stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.prompt_tokens == len(llm.tokenizer.encode_chat(chat("Tell me a story.")))


def test_stream_ends_with_done(server):
    body = json.dumps({"model": server.model, "prompt": "Hi", "max_tokens": 3, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    r = conn.getresponse()
    events = [line for line in r.read().decode().split("\n\n") if line]
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_strings_streamed_and_not(server):
    client = server.client()
    free = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    kwargs = dict(model=server.model, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop, "\x00never"])
    cut = client.completions.create(**kwargs)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(pieces) == cut.choices[0].text


def test_n_seed_and_logprobs(server):
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=chat("Hi"), max_tokens=6, temperature=1.0,
                                       seed=3, n=2, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model=server.model, messages=chat("Hi"), max_tokens=6, temperature=1.0,
                                           seed=3, n=2, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert r.choices[0].message.content != r.choices[1].message.content       # seed + i for choice i
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    c = client.completions.create(model=server.model, prompt="Hello", max_tokens=4, temperature=0, logprobs=1)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and lp.token_logprobs[0] == max(lp.top_logprobs[0].values()) and lp.text_offset[0] == 0


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("body,status,param,fragment", [
    (dict(temperature=5), 400, "temperature", "must be a number in [0, 2]"),
    (dict(top_p=0), 400, "top_p", "(0, 1]"),
    (dict(n=0), 400, "n", "integer in [1, 16]"),
    (dict(max_tokens="ten"), 400, "max_tokens", "must be an integer"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop", "1 to 4"),
    (dict(presence_penalty=0.5), 400, "presence_penalty", "unsupported parameter 'presence_penalty'"),
    (dict(tools=[{"type": "function"}]), 400, "tools", "unsupported parameter 'tools'"),
    (dict(top_logprobs=3), 400, "top_logprobs", "needs logprobs: true"),
    (dict(messages=[{"role": "user"}]), 400, "messages[0].content", "must be a string"),
    (dict(messages=[{"role": "user", "content": "word " * 600}]), 400, "messages", "the prompt is 6"),
    (dict(max_tokens=600), 400, "max_tokens", "maximum context length is 512"),
    (dict(model="gpt-4"), 404, "model", "does not exist"),
])
def test_bad_chat_requests_get_openai_errors(server, body, status, param, fragment):
    request = {"model": server.model, "messages": chat("Hi"), "max_tokens": 4, **body}
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(model=request.pop("model"), messages=request.pop("messages"),
                                                extra_body=request)
    assert e.value.status_code == status
    error = e.value.body
    assert error["param"] == param and fragment in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert server.health()["status"] == "ok"


def test_prompt_over_the_context_names_its_token_count(server, llm):
    prompt = "word " * 600
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=server.model, prompt=prompt, max_tokens=2)
    n = len(llm.tokenizer.encode(prompt))
    assert f"the prompt is {n} tokens" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"


def test_bad_json_and_unknown_routes(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", "{not json", {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["message"] == "the request body is not valid JSON"
    conn.request("GET", "/v1/nothing")
    r = conn.getresponse()
    assert r.status == 404 and "error" in json.loads(r.read())


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["message"] == "incorrect API key"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v1/models")                                  # no Authorization header at all
    r = conn.getresponse()
    assert r.status == 401 and "no API key" in json.loads(r.read())["error"]["message"]


# ----------------------------------------------------------------------------------------------------------------
# Slots and concurrency


def test_disconnect_mid_stream_frees_the_slots(server):
    before = server.health()["finished"].get("cancelled", 0)
    body = json.dumps({"model": server.model, "prompt": "Once", "max_tokens": 400, "n": 12, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")                   # it is streaming ...
    conn.sock.shutdown(socket.SHUT_RDWR)                           # ... and the client goes away
    conn.close()
    deadline = time.time() + 30
    while (h := server.health())["running"] or h["waiting"]:
        assert time.time() < deadline, h
        time.sleep(0.2)
    assert h["finished"].get("cancelled", 0) - before >= 8          # 12 x 400 tokens could not have finished
    r = server.client().completions.create(model=server.model, prompt="Hi", max_tokens=3)
    assert r.choices[0].finish_reason == "length"                    # and the server goes on


def concurrent_equals_alone(server, requests: list[dict]):
    """Each request alone (one after another), then all at once from threads: the same texts."""
    client = server.client()
    create = lambda r: (client.chat.completions.create(**r).choices[0].message.content if "messages" in r else
                        client.completions.create(**r).choices[0].text)
    alone = [create(r) for r in requests]
    together = [None] * len(requests)

    def run(i):
        together[i] = create(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_concurrent_greedy_requests_equal_each_alone(server):
    requests = [dict(model=server.model, prompt=p, max_tokens=16 + 3 * i, temperature=0)
                for i, p in enumerate(PROMPTS)]
    requests += [dict(model=server.model, messages=chat(c), max_tokens=20, temperature=0)
                 for c in ("Hello!", "What is the capital of France? Answer in one word.")]
    concurrent_equals_alone(server, requests)


@pytest.mark.slow
def test_smollm2_concurrent_greedy_requests_equal_each_alone(smollm2_dir):
    s = Server(smollm2_dir, "--max_batch_size", "8", "--max_seq_len", "1024")
    try:
        chats = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
                 "Name three prime numbers.", "Translate 'good morning' to Spanish.", "Who wrote Hamlet?"]
        requests = [dict(model=s.model, messages=chat(c), max_tokens=40, temperature=0) for c in chats]
        requests += [dict(model=s.model, prompt=p, max_tokens=30, temperature=0) for p in PROMPTS[:3]]
        concurrent_equals_alone(s, requests)
    finally:
        s.stop()
