"""The System page's Judge section and its "Check the judge" button, over HTTP against the real
app, with a small OpenAI-compatible server (tests/fakes/judge.py) standing in for the judge:
what it says when the judge answers, refuses the key, does not know the model, is too slow or is
not there, and that the key never reaches the page."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from devkit.live_server import free_port
from tests.fakes.judge import FakeJudge, serving

KEY = "sk-judge-secret-0123456789"
CHECK = "/partials/system/judge-check"


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    with serving() as server:
        server.key, server.models = KEY, {"qwen2.5-7b-instruct"}
        yield server


@contextmanager
def app_with(settings, **judge) -> Iterator[TestClient]:
    """The app over the test's database, with these judge settings."""
    judged = settings.model_copy(update=judge)
    with TestClient(create_app(judged), base_url="http://127.0.0.1") as client:
        yield client


def judged_by(fake: FakeJudge, settings, **more):
    given = {"judge_url": fake.url, "judge_model": "qwen2.5-7b-instruct"}
    return app_with(settings, **{**given, "judge_api_key": SecretStr(KEY), **more})


def check(client: TestClient) -> tuple[BeautifulSoup, str]:
    response = client.post(CHECK, headers={"accept": "text/html"})
    assert response.status_code == 200, response.text[:500]
    return BeautifulSoup(response.text, "html.parser"), response.text


def said(soup: BeautifulSoup, selector: str) -> str:
    return " ".join(soup.select_one(selector).text.split())


def test_the_judge_section_shows_model_host_rubric_and_how_to_set_it_never_the_key(
    db, settings, fake_judge
):
    url = fake_judge.url.replace("http://", f"http://user:{KEY}@")  # a key in the URL too
    with judged_by(fake_judge, settings, judge_url=url) as client:
        page = client.get("/system").text
        api = client.get("/api/system").text
    soup = BeautifulSoup(page, "html.parser")
    host = fake_judge.url.removesuffix("/v1")
    assert said(soup, "#judge .judge-model") == "qwen2.5-7b-instruct"
    assert said(soup, "#judge .judge-host") == host
    assert said(soup, "#judge .judge-key") == "key set"
    assert said(soup, "#judge .judge-rubric").startswith("Prefer the answer that is correct")
    assert "(the default)" in said(soup, "#judge .judge-rubric")
    names = [said(row, "th") for row in soup.select("#judge .judge-settings tr")]
    assert names == [
        "TUNEBOARD_JUDGE_URL",
        "TUNEBOARD_JUDGE_MODEL",
        "TUNEBOARD_JUDGE_RUBRIC",
        "TUNEBOARD_JUDGE_API_KEY",
        "TUNEBOARD_JUDGE_TIMEOUT_SECONDS",
    ]
    button = soup.select_one("#judge button.judge-check-button")
    assert button.text == "Check the judge" and button["hx-post"] == CHECK
    assert KEY not in page and KEY not in api
    assert f"qwen2.5-7b-instruct at {host} (key set)" in api


def test_with_no_judge_set_up_the_section_says_so_and_offers_no_check(client):
    soup = BeautifulSoup(client.get("/system", headers={"accept": "text/html"}).text, "html.parser")
    assert said(soup, "#judge .judge-none").startswith("none set up")
    assert soup.select_one("#judge button") is None
    assert "TUNEBOARD_JUDGE_URL" in said(soup, "#judge .judge-settings")
    assert said(check(client)[0], ".error-message") == "No judge is set up."


def test_checking_a_judge_that_answers_says_so(db, settings, fake_judge):
    rubric = "Prefer the shorter answer."
    with judged_by(fake_judge, settings, judge_rubric=rubric, judge_timeout_seconds=5) as client:
        soup, html = check(client)
        page = client.get("/system").text
    answered = said(soup, ".judge-answered")
    assert (
        answered.startswith("The judge answered in ") and "(qwen2.5-7b-instruct): 'OK'" in answered
    )
    assert soup.select_one(".error") is None
    # One small request, with the key as its bearer, the model named, never in the HTML.
    assert fake_judge.keys == [f"Bearer {KEY}"]
    assert fake_judge.bodies[0]["model"] == "qwen2.5-7b-instruct"
    assert fake_judge.bodies[0]["max_tokens"] <= 8
    assert KEY not in html
    rubric_shown = said(BeautifulSoup(page, "html.parser"), "#judge .judge-rubric")
    assert rubric_shown == rubric


def test_a_judge_that_refuses_the_key_says_which_setting_to_fix(db, settings, fake_judge):
    with judged_by(fake_judge, settings, judge_api_key=SecretStr("sk-wrong-key-42")) as client:
        soup, html = check(client)
    assert said(soup, ".error-message") == (
        "The judge refused the key (HTTP 401): Incorrect API key provided: [key]."
    )
    assert "TUNEBOARD_JUDGE_API_KEY" in said(soup, ".error-hint")
    assert "sk-wrong-key-42" not in html  # though the judge quoted it back
    with judged_by(fake_judge, settings, judge_api_key=None) as client:
        soup, _ = check(client)
    assert said(soup, ".error-message").startswith(
        "The judge wants a key (HTTP 401) and none is set"
    )


def test_a_judge_that_does_not_know_the_model_names_it(db, settings, fake_judge):
    with judged_by(fake_judge, settings, judge_model="qwen-typo") as client:
        soup, _ = check(client)
    message = said(soup, ".error-message")
    assert message.startswith("The judge does not know the model 'qwen-typo' (HTTP 404)")
    assert "TUNEBOARD_JUDGE_MODEL" in said(soup, ".error-hint")


def test_a_url_without_the_api_path_says_what_the_url_should_look_like(db, settings, fake_judge):
    with judged_by(fake_judge, settings, judge_url=fake_judge.url.removesuffix("/v1")) as client:
        soup, _ = check(client)
    assert (
        said(soup, ".error-message") == "Nothing answers chat completions at that URL (HTTP 404)."
    )
    assert "such as http://127.0.0.1:8080/v1" in said(soup, ".error-hint")


def test_an_unreachable_judge_says_so_with_its_host(db, settings):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with app_with(settings, judge_url=url, judge_model="m", judge_timeout_seconds=5) as client:
        soup, _ = check(client)
    message = said(soup, ".error-message")
    assert message == (
        f"The judge at http://127.0.0.1:{port} is unreachable: nothing listens on that port "
        "(connection refused)."
    )
    assert "TUNEBOARD_JUDGE_URL" in said(soup, ".error-hint")


def test_a_judge_slower_than_its_timeout_says_how_long_it_waited(db, settings, fake_judge):
    fake_judge.delay = 2.0
    with judged_by(fake_judge, settings, judge_timeout_seconds=0.5) as client:
        soup, _ = check(client)
    assert said(soup, ".error-message") == (
        f"The judge at {fake_judge.url.removesuffix('/v1')} did not answer within 0.5 s."
    )
    assert "TUNEBOARD_JUDGE_TIMEOUT_SECONDS" in said(soup, ".error-hint")
