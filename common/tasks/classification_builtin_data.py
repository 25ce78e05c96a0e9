"""A deterministic, offline text-classification data set: ``dataset = "builtin"``.

Three domains (clinical triage notes, financial news, retail reviews) share one label
set: ``negative`` / ``neutral`` / ``positive`` (a worsening / stable / improving
patient, a falling / flat / rising market, a bad / ok / great product). Each text is a
template filled with a subject, one or two label cue phrases and neutral filler.

The task is learnable but not trivial: about 7 % of the examples carry the cues of a
different label (label noise, so no model can reach 100 %) and about 8 % mix one cue of
their own label with one of another label. A bag-of-words model therefore tops out
below 100 %, and a pretrained encoder with a fresh head starts near chance (1 in 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

LABELS = ("negative", "neutral", "positive")
DOMAINS = ("clinical", "finance", "retail")

_NOISE_RATE = 0.07  # cues taken wholly from another label: caps accuracy near 93 %
_MIXED_RATE = 0.08  # one own cue plus one cue of another label: ambiguous examples


@dataclass(frozen=True)
class _Lexicon:
    """The words of one domain; ``cues`` is indexed like ``LABELS``."""

    subjects: tuple[str, ...]
    cues: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    fillers: tuple[str, ...]
    one_cue: tuple[str, ...]  # templates with {subj}, {cue}, {fill}
    two_cue: tuple[str, ...]  # templates with {subj}, {cue}, {cue2}, {fill}


_CLINICAL = _Lexicon(
    subjects=("the patient in bed 4", "Mr. Alvarez", "the post-op patient",
              "Mrs. Okafor", "the elderly patient in triage", "the patient"),
    cues=(
        ("is worsening", "has a rising fever", "reports more chest pain",
         "needed extra oxygen", "became more confused", "has dropping blood pressure"),
        ("is unchanged", "remains stable", "has no new complaints",
         "shows steady vitals", "is resting as before", "continues on the same plan"),
        ("is improving", "walked the hallway unaided", "is afebrile and eating well",
         "reports much less pain", "was weaned off oxygen", "is recovering nicely"),
    ),
    fillers=("family visited in the afternoon", "medications were reviewed",
             "plan discussed with the team", "labs are pending",
             "next check is at noon", "chart updated by the night nurse"),
    one_cue=("{subj} {cue} overnight, {fill}.",
             "On morning rounds {subj} {cue}; {fill}.",
             "Triage note: {subj} {cue}. {fill}.",
             "{fill}; per the attending {subj} {cue}."),
    two_cue=("Nursing note: {subj} {cue} and {cue2}; {fill}.",
             "{subj} {cue}, although later {cue2}. {fill}."),
)

_FINANCE = _Lexicon(
    subjects=("shares of Norvale Corp", "the regional bank index", "Brent crude futures",
              "the tech-heavy index", "Ardent Mining stock", "the euro"),
    cues=(
        ("fell sharply", "slumped after weak guidance", "dropped to a yearly low",
         "lost ground on recession fears", "tumbled as earnings missed", "sank again"),
        ("traded flat", "was little changed", "ended the session unchanged",
         "held steady in thin volume", "moved sideways", "hovered near its open"),
        ("rallied strongly", "climbed to a record high", "rose after strong earnings",
         "jumped on upbeat guidance", "gained ground", "surged in late trading"),
    ),
    fillers=("analysts await the central bank decision", "volume was about average",
             "markets in Asia closed earlier", "the quarter ends next week",
             "traders watched bond yields", "the report came out before noon"),
    one_cue=("{subj} {cue} on Tuesday, {fill}.",
             "Market wrap: {subj} {cue}; {fill}.",
             "{fill}, while {subj} {cue}.",
             "In early trading {subj} {cue} as {fill}."),
    two_cue=("{subj} {cue} and then {cue2}, {fill}.",
             "Midday update: {subj} {cue} but {cue2}; {fill}."),
)

_RETAIL = _Lexicon(
    subjects=("this blender", "this pair of running shoes", "the phone case I ordered",
              "this desk lamp", "the winter jacket", "the coffee grinder"),
    cues=(
        ("broke after a week", "is a waste of money", "arrived damaged",
         "stopped working quickly", "was terribly disappointing", "feels cheap and flimsy"),
        ("is okay for the price", "does the job, nothing more", "is just average",
         "works as described", "is fine but unremarkable", "is neither good nor bad"),
        ("is absolutely great", "exceeded my expectations", "works perfectly",
         "is worth every penny", "is my best purchase this year", "feels really solid"),
    ),
    fillers=("shipping took four days", "I bought it for my sister",
             "the color matches the photo", "the packaging was plain",
             "I have used it for a month", "it came with a manual"),
    one_cue=("{subj} {cue}, {fill}.",
             "Review: {subj} {cue}. {fill}.",
             "{fill}, and honestly {subj} {cue}.",
             "After two weeks I can say {subj} {cue}; {fill}."),
    two_cue=("{subj} {cue} and {cue2}; {fill}.",
             "Update: {subj} {cue}, but {cue2}. {fill}."),
)

_LEXICONS = (_CLINICAL, _FINANCE, _RETAIL)  # indexed like DOMAINS


def generate_builtin(num_examples: int, *, seed: int) -> pd.DataFrame:
    """Generate the built-in data set.

    Parameters
    ----------
    num_examples
        Number of rows (>= 1).
    seed
        Seed of the only random generator used; the same seed gives the same frame.

    Returns
    -------
    pandas.DataFrame
        Columns ``text``, ``label`` (one of ``LABELS``) and ``domain`` (one of
        ``DOMAINS``), in random order. Labels and domains are balanced to within one
        row each; their combinations are balanced in expectation.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % len(LABELS))
    domains = rng.permutation(np.arange(num_examples) % len(DOMAINS))
    texts = [
        _make_text(_LEXICONS[domain], int(label), rng)
        for domain, label in zip(domains, labels, strict=True)
    ]
    return pd.DataFrame({
        "text": texts,
        "label": [LABELS[i] for i in labels],
        "domain": [DOMAINS[i] for i in domains],
    })


def _make_text(lexicon: _Lexicon, label: int, rng: np.random.Generator) -> str:
    """One text of ``label``, possibly with noisy or mixed cues."""
    roll = rng.random()
    cue_label = _other_label(label, rng) if roll < _NOISE_RATE else label
    mixed = _NOISE_RATE <= roll < _NOISE_RATE + _MIXED_RATE
    cue, cue2 = rng.choice(lexicon.cues[cue_label], size=2, replace=False)
    if mixed:
        cue2 = rng.choice(lexicon.cues[_other_label(label, rng)])
    # Mixed examples need both cues; the others use two cues a third of the time.
    use_two = mixed or rng.random() < 1 / 3
    templates = lexicon.two_cue if use_two else lexicon.one_cue
    if mixed and rng.random() < 0.5:
        cue, cue2 = cue2, cue  # the own-label cue is not always first
    text = str(rng.choice(templates)).format(
        subj=rng.choice(lexicon.subjects),
        cue=cue,
        cue2=cue2,
        fill=rng.choice(lexicon.fillers),
    )
    # Capitalise the first letter of every sentence ("... pending. Labs ...").
    return re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _other_label(label: int, rng: np.random.Generator) -> int:
    """A label index different from ``label``, uniformly."""
    return (label + 1 + int(rng.integers(len(LABELS) - 1))) % len(LABELS)
