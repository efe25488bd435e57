"""A GPT judge behind any OpenAI-compatible `/chat/completions` endpoint (OpenAI, Azure-style proxies, vLLM,
SGLang, a local `polyfocus serve`), with retries and a response cache.

    judge = Judge(base_url="http://localhost:8000/v1", model="gpt-4-0613", api_key="...",
                  cache="out/judge_cache.jsonl")
    text = judge.chat([{"role": "user", "content": "..."}], temperature=0.0, max_tokens=3)

Only the standard library is used (urllib), so nothing beyond the endpoint is assumed. Transient failures
(connection errors, timeouts, HTTP 408/409/429/5xx, a reply without choices) are retried with exponential
backoff; other HTTP errors (a wrong key, an unknown model) fail at once with the server's message. Every reply
is appended to the cache file keyed by the request, so an interrupted scoring run does not pay twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge endpoint failed for good (after the retries, or with a non-retryable error)."""


class Judge:
    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 cache: str | os.PathLike | None = None, max_retries: int = 6, timeout: float = 120.0,
                 backoff: float = 1.0):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_retries, self.timeout, self.backoff = max_retries, timeout, backoff
        self.cache_path = Path(cache) if cache else None
        self.cache = self._read_cache()

    def describe(self) -> dict:
        """What results.json records about the judge (never the key)."""
        return {"base_url": self.base_url, "model": self.model}

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int | None = None,
             model: str | None = None) -> str:
        body = {"model": model or self.model, "messages": messages, "temperature": temperature}
        if body["model"] is None:
            raise JudgeError("no judge model given (--judge-model)")
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        content = self._post_with_retries(body)
        self._remember(key, content)
        return content

    def _post_with_retries(self, body: dict) -> str:
        if self.base_url == DEFAULT_BASE_URL and not self.api_key:
            raise JudgeError("no API key for the judge: set OPENAI_API_KEY or pass --judge-api-key "
                             "(or point --judge-base-url at another OpenAI-compatible endpoint)")
        last_error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            try:
                return self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code not in RETRYABLE_STATUS:
                    raise JudgeError(f"judge {self.base_url}: HTTP {e.code}: {detail}") from None
                last_error = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError, IndexError) as e:
                last_error = f"{type(e).__name__}: {e}"
        raise JudgeError(f"judge {self.base_url}: gave up after {self.max_retries + 1} attempts ({last_error})")

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read())
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"reply without text content: {str(reply)[:200]}")
        return content

    def _read_cache(self) -> dict[str, str]:
        cache = {}
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    cache[entry["key"]] = entry["content"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run
        return cache

    def _remember(self, key: str, content: str) -> None:
        self.cache[key] = content
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n")
