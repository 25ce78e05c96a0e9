"""A deterministic, offline chat SFT data set with checkable answers (``generate_sft``).

Four instruction tasks from the domains of ``classification_builtin_data.py`` (clinical,
finance, retail), each asking for a short answer in a fixed format that the text determines:

=============  ========  =====================================================
task           domain    answer (example)
=============  ========  =====================================================
``triage``     clinical  ``department: cardiology; urgency: high`` — the
                         department follows from the complaint, the urgency
                         from how the patient presents
``medication`` clinical  ``medication: amoxicillin; dose: 500 mg`` — copied
                         from a medication note
``ticker``     finance   ``NRVL down`` — the ticker in the news item and the
                         direction its wording gives (up / down / flat)
``sentiment``  retail    ``positive`` / ``neutral`` / ``negative`` for a review
=============  ========  =====================================================

A chat model that was never trained on them answers in its own words (exact match
near 0, some token F1); after fine-tuning it learns the formats and the cue-to-answer
mappings, so exact match climbs. There is no label noise: every answer is right.
The ``task`` and ``domain`` columns are there for non-IID partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SFT_TASKS = ("triage", "medication", "ticker", "sentiment")
TASK_DOMAINS = {"triage": "clinical", "medication": "clinical", "ticker": "finance",
                "sentiment": "retail"}

# --- clinical: triage ------------------------------------------------------------------

_DEPARTMENTS = {
    "cardiology": ("crushing chest pain radiating to the left arm", "palpitations and "
                   "a racing heart", "chest tightness on exertion", "a very slow pulse "
                   "and dizziness"),
    "orthopedics": ("a swollen, deformed wrist after a fall", "knee pain after a skiing "
                    "injury", "a suspected hip fracture", "back pain after lifting a box"),
    "neurology": ("sudden weakness of the right arm", "slurred speech since the morning",
                  "the worst headache ever experienced", "a first seizure at home"),
    "pulmonology": ("wheezing and shortness of breath", "a cough with blood-streaked "
                    "sputum", "low oxygen saturation and a cough", "an asthma attack not "
                    "relieved by the inhaler"),
}
_URGENCY = {
    "high": ("arrived by ambulance with unstable vitals", "is drowsy and hard to rouse",
             "has a blood pressure of 80/50", "needed resuscitation on arrival"),
    "medium": ("is uncomfortable but alert", "has stable vitals and moderate pain",
               "walked in with a relative, pain 6/10", "is alert with mildly raised "
               "heart rate"),
    "low": ("walked in and is comfortable", "has normal vitals and mild pain",
            "is chatting calmly in the waiting room", "came in by bus, pain 2/10"),
}
_PATIENTS = ("A 54-year-old man", "A 31-year-old woman", "An 80-year-old woman",
             "A 67-year-old man", "A 22-year-old student", "A 45-year-old teacher")
_TRIAGE_TEMPLATES = (
    "{patient} presents with {complaint}; the patient {urgency}.",
    "Triage note: {patient} with {complaint}. On assessment the patient {urgency}.",
    "{patient} {urgency_clause} after {complaint_clause}.",
)

# --- clinical: medication --------------------------------------------------------------

_ORAL, _IV, _SC = "by mouth", "intravenously", "subcutaneously"
_MEDICATIONS = {  # name: (doses, routes)
    "amoxicillin": (("250 mg", "500 mg"), (_ORAL,)),
    "ibuprofen": (("200 mg", "400 mg"), (_ORAL,)),
    "paracetamol": (("500 mg", "1 g"), (_ORAL, _IV)),
    "metformin": (("500 mg", "850 mg"), (_ORAL,)),
    "furosemide": (("20 mg", "40 mg"), (_ORAL, _IV)),
    "heparin": (("5000 units",), (_SC,)),
    "morphine": (("2 mg", "5 mg"), (_IV, _SC)),
    "ondansetron": (("4 mg", "8 mg"), (_ORAL, _IV)),
}
_REASONS = ("for pain", "for fever", "as prescribed", "for nausea", "per the protocol",
            "before the procedure")
_TIMES = ("at 08:00", "at noon", "at 14:30", "at 22:00", "on the night shift")
_MEDICATION_TEMPLATES = (
    "Gave {medication} {dose} {route} {time} {reason}.",
    "Medication note: {medication} {dose} administered {route} {time}, {reason}.",
    "{time_cap}, the patient received {medication} {dose} {route} {reason}.",
)

# --- finance: ticker -------------------------------------------------------------------

_COMPANIES = (("Norvale Corp", "NRVL"), ("Ardent Mining", "ARDM"), ("Kestrel Air", "KSTR"),
              ("Pinecrest Bank", "PNCB"), ("Lumora Health", "LMRA"),
              ("Quillon Software", "QLSW"), ("Tidewater Foods", "TDWF"),
              ("Brightfield Energy", "BRFE"))
_DIRECTIONS = {
    "up": ("rallied strongly", "climbed to a record high", "rose after strong earnings",
           "jumped on upbeat guidance", "surged in late trading"),
    "down": ("fell sharply", "slumped after weak guidance", "dropped to a yearly low",
             "tumbled as earnings missed", "sank on recession fears"),
    "flat": ("traded flat", "was little changed", "ended the session unchanged",
             "held steady in thin volume", "hovered near its open"),
}
_MARKET_FILLERS = ("analysts await the central bank decision", "volume was about average",
                   "markets in Asia closed earlier", "traders watched bond yields",
                   "the quarter ends next week")
_TICKER_TEMPLATES = (
    "Shares of {company} ({ticker}) {move} on Tuesday, as {filler}.",
    "Market wrap: {company} ({ticker}) {move}; {filler}.",
    "{filler_cap}, while {company} (ticker {ticker}) {move}.",
)

# --- retail: sentiment -----------------------------------------------------------------

_PRODUCTS = ("this blender", "these running shoes", "the phone case I ordered",
             "this desk lamp", "the winter jacket", "the coffee grinder")
_SENTIMENTS = {
    "negative": ("broke after a week", "is a waste of money", "arrived damaged",
                 "stopped working quickly", "feels cheap and flimsy"),
    "neutral": ("is okay for the price", "does the job, nothing more", "is just average",
                "works as described", "is neither good nor bad"),
    "positive": ("is absolutely great", "exceeded my expectations", "works perfectly",
                 "is worth every penny", "feels really solid"),
}
_REVIEW_FILLERS = ("shipping took four days", "I bought it for my sister",
                   "the color matches the photo", "the packaging was plain",
                   "I have used it for a month")
_REVIEW_TEMPLATES = ("Review: {product} {cue}. {filler_cap}.",
                     "{filler_cap}, and honestly {product} {cue}.",
                     "After two weeks I can say {product} {cue}; {filler}.")

_INSTRUCTIONS = {
    "triage": "Extract the department and the urgency from this triage note. Answer "
              "exactly as `department: <cardiology|orthopedics|neurology|pulmonology>; "
              "urgency: <low|medium|high>`.",
    "medication": "Extract the medication and the dose from this note. Answer exactly as "
                  "`medication: <name>; dose: <amount and unit>`.",
    "ticker": "Give the ticker of the company in this news item and the direction of its "
              "stock. Answer exactly as `<TICKER> <up|down|flat>`.",
    "sentiment": "What is the sentiment of this product review? Answer with one word: "
                 "positive, neutral or negative.",
}


@dataclass(frozen=True)
class _Example:
    """One generated instruction: the text to work on and its reference answer."""

    text: str
    answer: str


def generate_sft(num_examples: int, seed: int) -> pd.DataFrame:
    """Generate the built-in chat SFT data set (module doc).

    Parameters
    ----------
    num_examples
        Number of rows (>= 1).
    seed
        Seed of the only random generator used; the same seed gives the same frame.

    Returns
    -------
    pandas.DataFrame
        Columns ``messages`` (a user message — the instruction, a blank line and the
        text — and the assistant's reference answer, as ``common.tasks.sft_chat_data`` defines
        conversations), ``task`` (one of ``SFT_TASKS``) and ``domain`` (its
        ``TASK_DOMAINS`` entry), in random order; tasks are balanced to within one row.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    tasks = [SFT_TASKS[i] for i in rng.permutation(np.arange(num_examples) % len(SFT_TASKS))]
    messages = []
    for task in tasks:
        example = _MAKERS[task](rng)
        messages.append([
            {"role": "user", "content": f"{_INSTRUCTIONS[task]}\n\n{example.text}"},
            {"role": "assistant", "content": example.answer},
        ])
    return pd.DataFrame({
        "messages": messages,
        "task": tasks,
        "domain": [TASK_DOMAINS[task] for task in tasks],
    })


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of ``options``, uniformly."""
    return str(options[int(rng.integers(len(options)))])


def _capitalize(text: str) -> str:
    """``text`` with its first letter upper case (the rest unchanged)."""
    return text[:1].upper() + text[1:]


def _triage(rng: np.random.Generator) -> _Example:
    """A triage note whose complaint gives the department and presentation the urgency."""
    department = _pick(rng, tuple(_DEPARTMENTS))
    urgency = _pick(rng, tuple(_URGENCY))
    complaint, presentation = _pick(rng, _DEPARTMENTS[department]), _pick(rng,
                                                                          _URGENCY[urgency])
    text = _pick(rng, _TRIAGE_TEMPLATES).format(
        patient=_pick(rng, _PATIENTS), complaint=complaint, urgency=presentation,
        urgency_clause=presentation, complaint_clause=f"developing {complaint}",
    )
    return _Example(text, f"department: {department}; urgency: {urgency}")


def _medication(rng: np.random.Generator) -> _Example:
    """A medication administration note; the answer copies the drug and its dose."""
    medication = _pick(rng, tuple(_MEDICATIONS))
    doses, routes = _MEDICATIONS[medication]
    dose, time = _pick(rng, doses), _pick(rng, _TIMES)
    text = _pick(rng, _MEDICATION_TEMPLATES).format(
        medication=medication, dose=dose, route=_pick(rng, routes), time=time,
        time_cap=_capitalize(time), reason=_pick(rng, _REASONS),
    )
    return _Example(text, f"medication: {medication}; dose: {dose}")


def _ticker(rng: np.random.Generator) -> _Example:
    """A market news item naming one company, its ticker and how its stock moved."""
    company, ticker = _COMPANIES[int(rng.integers(len(_COMPANIES)))]
    direction = _pick(rng, tuple(_DIRECTIONS))
    filler = _pick(rng, _MARKET_FILLERS)
    text = _pick(rng, _TICKER_TEMPLATES).format(
        company=company, ticker=ticker, move=_pick(rng, _DIRECTIONS[direction]),
        filler=filler, filler_cap=_capitalize(filler),
    )
    return _Example(text, f"{ticker} {direction}")


def _sentiment(rng: np.random.Generator) -> _Example:
    """A product review with one sentiment cue."""
    sentiment = _pick(rng, tuple(_SENTIMENTS))
    filler = _pick(rng, _REVIEW_FILLERS)
    text = _pick(rng, _REVIEW_TEMPLATES).format(
        product=_pick(rng, _PRODUCTS), cue=_pick(rng, _SENTIMENTS[sentiment]),
        filler=filler, filler_cap=_capitalize(filler),
    )
    return _Example(_capitalize(text), sentiment)


_MAKERS = {"triage": _triage, "medication": _medication, "ticker": _ticker,
           "sentiment": _sentiment}
