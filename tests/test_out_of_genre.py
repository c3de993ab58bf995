"""The out-of-genre check: synthetic 'SMS messages' that are code or markup are counted against the real texts' own
range, with the real held-out texts as the floor, and they turn the verdict red whatever the accuracy."""

from __future__ import annotations

import random

from dpsynth.evaluate.fidelity import markup_score, out_of_genre, signal_rarity
from dpsynth.evaluate.utility import genre_verdict

WORDS = ("hey are we still on for tonight call me when you get home love u lol ok see you at the station "
         "free entry win a prize txt now sorry cant talk running late dinner at 8 pick up milk pls").split()
CODE = [
    "def send(msg):\n    return client.post(url, data={'text': msg})",
    "import os\nimport sys\nfrom pathlib import Path",
    "<div class=\"msg\"><span>Hello</span></div>",
    "for (let i = 0; i < n; i++) {\n  console.log(items[i]);\n}",
    "{\"id\": 42, \"text\": \"hi\", \"read\": false}",
    "class SmsParser(BaseParser):\n    def __init__(self, cfg):\n        self.cfg = cfg",
    "const sendMessage = (to, body) => api.send({to, body});",
    "if x == 0:\n    raise ValueError(\"empty\")",
    "<a href=\"https://example.com/win\">Claim</a><br/>",
    "SELECT text, label FROM sms_messages WHERE label = 'spam';",
    "self.model.eval()\nout = self.model(input_ids=ids)",
    "#include <stdio.h>\nint main() { printf(\"hi\\n\"); return 0; }",
]


def sms(rng: random.Random) -> str:
    text = " ".join(rng.choices(WORDS, k=rng.randint(3, 22)))
    if rng.random() < 0.15:
        text += f" call 0{rng.randint(7000000000, 7999999999)}"
    if rng.random() < 0.05:
        text += " http://bit.ly/" + "".join(rng.choices("abcxyz019", k=6))
    if rng.random() < 0.05:
        text = text.capitalize() + "!!! :-)"
    return text


def corpora(n_real=1000, n_syn=400, code_share=0.45, seed=0):
    rng = random.Random(seed)
    real = [sms(rng) for _ in range(n_real)]
    n_code = round(code_share * n_syn)
    syn = [sms(rng) for _ in range(n_syn - n_code)] + [rng.choice(CODE) for _ in range(n_code)]
    rng.shuffle(syn)
    return real[: n_real // 2], real[n_real // 2:], syn


def test_code_snippets_among_sms_are_counted():
    ref, held, syn = corpora(code_share=0.45)
    out = out_of_genre(syn, ref, held)
    assert abs(out["share"] - 0.45) <= 0.02, out["share"]
    assert out["real_share"] <= 0.02
    assert 1 <= len(out["examples"]) <= 3 and all(len(e) <= 120 for e in out["examples"])
    assert all(e in {c[:120] for c in CODE} for e in out["examples"])
    assert out["signals"]["synthetic"]["symbols"] > out["signals"]["real"]["symbols"]


def test_real_like_synthetic_texts_are_in_genre():
    ref, held, syn = corpora(code_share=0.0, seed=1)
    out = out_of_genre(syn, ref, held)
    assert out["share"] <= 0.02 and out["real_share"] <= 0.02 and out["examples"] == []


def test_signals_the_real_texts_have_weigh_less():
    real = [f"see http://t.co/x{i} now" for i in range(50)] + ["plain words only"] * 50
    rarity = signal_rarity(real)
    assert rarity["markup"] < 0.3 and rarity["keywords"] == 1.0
    url_sms = "see http://t.co/abc now"
    assert markup_score(url_sms, rarity) < markup_score(url_sms)


def test_the_verdict_says_out_of_genre_whatever_the_accuracy():
    good = {"level": "competitive", "text": "competitive with DP-direct: synthetic 0.800 vs 0.790"}
    ref, held, syn = corpora(code_share=0.45)
    v = genre_verdict(good, out_of_genre(syn, ref, held), 0.10)
    assert v["level"] == "out_of_genre" and v["accuracy_level"] == "competitive"
    assert v["text"].startswith("out of genre: 45% of the synthetic texts") and "competitive" in v["text"]
    ref, held, syn = corpora(code_share=0.0)
    assert genre_verdict(good, out_of_genre(syn, ref, held), 0.10) is good
    assert genre_verdict(good, {"share": None}, 0.10) is good
