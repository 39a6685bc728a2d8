#!/usr/bin/env python3
"""Reference scores of the text_similarity grader's metrics, for graft's `reward_fns::similarity`.

Writes tests/fixtures/graders/text_similarity.json: ~24 (input, reference) pairs and, for each, the score of every
metric graft computes locally, from the Python libraries OpenAI names (rapidfuzz, nltk, rouge-score), each with its
defaults:

- fuzzy_match: rapidfuzz `fuzz.ratio(input, reference) / 100`
- bleu: nltk `sentence_bleu([reference.split()], input.split())` (4-gram, uniform weights, no smoothing)
- gleu: nltk `sentence_gleu([reference.split()], input.split())`
- meteor: nltk `meteor_score([reference.split()], input.split())` with an identity stemmer and an empty WordNet:
  WordNet is an nltk data download (not on PyPI), so graft matches exact lower-cased words only, and so does this.
- rouge_1..rouge_5, rouge_l: rouge-score `RougeScorer([type]).score(reference, input)[type].fmeasure` (no stemmer)

Deterministic, ~10 KB, < 1 s.

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-graders
    /work/pyref-graders/bin/pip install --quiet nltk==3.9.1 rouge-score==0.1.2 rapidfuzz==3.10.1
    /work/pyref-graders/bin/python scripts/gen_grader_fixture.py
"""

import json
import warnings
from importlib.metadata import version
from pathlib import Path

from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.gleu_score import sentence_gleu
from nltk.translate.meteor_score import meteor_score
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "graders" / "text_similarity.json"

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat is on the mat"),
    ("The Cat sat on the Mat.", "the cat sat on the mat"),
    ("a quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog"),
    ("dog", "cat"),
    ("", "something"),
    ("something", ""),
    ("Paris", "paris"),
    ("42", "42"),
    ("The answer is 42.", "42"),
    ("It is a guide to action which ensures that the military always obeys the commands of the party",
     "It is a guide to action that ensures that the military will forever heed Party commands"),
    ("he read the book because he was interested in world history",
     "he was interested in world history because he read the book"),
    ("the the the the the the the", "the cat is on the mat"),
    ("on the mat the cat sat", "the cat sat on the mat"),
    ("Tokyo is the capital of Japan.", "The capital of Japan is Tokyo."),
    ("naïve café résumé", "naive cafe resume"),
    ("  spaced   out\ttext\nhere ", "spaced out text here"),
    ("x y z x y z", "x y z"),
    ("alpha beta gamma delta epsilon", "alpha gamma beta delta epsilon zeta"),
    ("one two three four five six seven eight nine ten", "one two three four five six seven eight nine ten eleven"),
    ("COVID-19 cases rose 3.5% in Q2", "covid 19 cases rose 3 5 percent in q2"),
    ("def add(a, b): return a + b", "def add(x, y): return x + y"),
    ("I like green eggs and ham", "I do not like green eggs and ham, Sam I am"),
    ("ab", "ba"),
]


class IdentityStemmer:
    def stem(self, word):
        return word


class NoWordNet:
    def synsets(self, word):
        return []


def scores(inp, ref):
    hyp, refs = inp.split(), ref.split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram counts
        out = {
            "fuzzy_match": fuzz.ratio(inp, ref) / 100,
            "bleu": float(sentence_bleu([refs], hyp)),
            "gleu": float(sentence_gleu([refs], hyp)),
            "meteor": float(meteor_score([refs], hyp, stemmer=IdentityStemmer(), wordnet=NoWordNet())),
        }
    for n in ["1", "2", "3", "4", "5", "L"]:
        t = f"rouge{n}"
        out[f"rouge_{n.lower()}"] = rouge_scorer.RougeScorer([t]).score(ref, inp)[t].fmeasure
    return out


def main():
    fixture = {
        "generator": "scripts/gen_grader_fixture.py",
        "versions": {p: version(p) for p in ["nltk", "rouge-score", "rapidfuzz"]},
        "cases": [{"input": i, "reference": r, "scores": scores(i, r)} for i, r in PAIRS],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(PAIRS)} cases)")


if __name__ == "__main__":
    main()
