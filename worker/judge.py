"""The evaluation report's optional judge: an OpenAI-compatible chat endpoint asked which of two
answers is better.

The user names the endpoint (a base URL such as `http://127.0.0.1:8080/v1`), the model and a
rubric (settings `TUNEBOARD_JUDGE_*`, or the fields of a re-run request); the key is only ever the
worker's setting `TUNEBOARD_JUDGE_API_KEY`, sent as a bearer header and written nowhere. Each pair
of answers is judged twice, base first and adapter first, so a judge that prefers whichever answer
it reads first cancels out. A judge that is down, slow or answers something other than A, B or
tie raises `JudgeError`: the report marks that row and goes on.

Stdlib `urllib` only, like the rest of the worker's HTTP.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from app.settings import DEFAULT_JUDGE_RUBRIC as DEFAULT_RUBRIC
from app.settings import chat_completions_url

VERDICTS = {"A": "A", "B": "B", "TIE": "tie", "T": "tie"}


class JudgeError(Exception):
    """The judge gave no usable verdict; the message says why, for the report's row."""


@dataclass(frozen=True)
class Judge:
    url: str
    model: str
    rubric: str = ""
    api_key: str | None = None
    timeout_seconds: float = 60.0

    @property
    def endpoint(self) -> str:
        return chat_completions_url(self.url)

    def describe(self) -> dict[str, str]:
        """What the report may show of the judge: never the key."""
        return {"url": self.url, "model": self.model, "rubric": self.rubric or DEFAULT_RUBRIC}

    def verdict(self, prompt: str, reference: str, first: str, second: str) -> str:
        """ "A" (the first answer is better), "B" or "tie"; JudgeError when there is none."""
        question = (
            f"Question:\n{prompt}\n\nReference answer:\n{reference}\n\n"
            f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer is better? Reply with one word: A, B or tie."
        )
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "system",
                    "content": f"You judge answers. {self.rubric or DEFAULT_RUBRIC}",
                },
                {"role": "user", "content": question},
            ],
            "temperature": 0,
            "max_tokens": 8,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise JudgeError(f"The judge answered HTTP {exc.code} ({exc.reason}).") from exc
        except TimeoutError as exc:
            raise JudgeError(
                f"The judge did not answer within {self.timeout_seconds:g} s."
            ) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise JudgeError(
                    f"The judge did not answer within {self.timeout_seconds:g} s."
                ) from exc
            raise JudgeError(f"The judge at {self.url} is unreachable: {exc.reason}.") from exc
        except OSError as exc:
            raise JudgeError(f"The judge at {self.url} is unreachable: {exc}.") from exc
        return _parse(raw)


def _parse(raw: bytes) -> str:
    try:
        text = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise JudgeError(
            "The judge's reply is not an OpenAI chat completion: " + repr(raw[:80])
        ) from exc
    word = str(text).strip().strip(".:!*\"'").upper()
    if word not in VERDICTS:
        raise JudgeError(f"The judge answered {str(text)[:80]!r}, not A, B or tie.")
    return VERDICTS[word]
