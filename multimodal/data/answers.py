"""VQA answer normalisation: the processing of the official VQA evaluation script.

Written here from the published description of the VQA evaluation code (`processPunctuation`
then `processDigitArticle`) because no installed library has it. It lives in `data` because the
datamodules count and look up answers in this form when they build the answer vocabulary;
`multimodal.eval` imports it from here, so training targets and scores agree.

The steps, in order:
1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the
   answer has it next to a space (``"red, white"`` -> ``"red white"``) or the answer holds a
   digit-comma-digit number (``"1,000"`` -> ``"1000"``), else replaced by a space
   (``"black-and-white"`` -> ``"black and white"``); a period is deleted unless a digit follows
   it (``"2.5"`` is kept, ``"mr. smith"`` -> ``"mr smith"``). The apostrophe is not punctuation;
3. lower-case and split on whitespace; number words ``none``/``zero`` .. ``ten`` become digits;
   the articles ``a``, ``an``, ``the`` are dropped; contractions written without their
   apostrophe are restored (``"dont"`` -> ``"don't"``); words joined by single spaces.

The contraction table was compared whole with the official one (`VQAEval.contractions` in
the VQA API's PythonEvaluationTools/vqaEvaluation/vqaEval.py, GT-Vision-Lab/VQA): 113 of its
120 keys map to the same contraction here (``"whyll"``, ``"whyre"``, ``"whys"`` and the three
spellings of ``"'ow's'at"`` included); the departures are:
- keys that can never match after lower-casing (``"Im"``, ``"Ive"``, ``"Id've"``, ``"I'dve"``)
  are left out: no result changes;
- the identity entries (``"let's"``, ``"she's"`` mapped to themselves) are left out: no result
  changes;
- one reversed entry (``"somebody'd"`` -> ``"somebodyd"``) is left out, so that word is kept;
- words with two or more apostrophes are also restored from the spelling with none
  (``"couldntve"`` -> ``"couldn't've"``, ``"owsat"`` -> ``"'ow's'at"``: 19 keys), which the
  official table misses.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer"]

# The official punctuation list (apostrophe and period excluded: periods are handled apart).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
_PUNCTUATION += ("@", "`", ",", "?", "!")
_COMMA_NUMBER = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead that never
# fails, so in effect a period is removed unless a digit follows it; that is what we do.
_PERIOD = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})


# Contractions of the official table, each restored from its spelling without apostrophes.
_CONTRACTIONS_WRITTEN = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
why'll why're why's 'ow's'at
"""


def _contractions() -> dict[str, str]:
    """Apostrophe-less spelling -> contraction, for the entries of the official table that can
    match a lower-cased word (every contraction below maps its apostrophe-free spelling)."""
    words = _CONTRACTIONS_WRITTEN.split()
    table = {word.replace("'", ""): word for word in words}
    # The official table also maps the forms that lack one apostrophe of several.
    for word in words:
        marks = [i for i, c in enumerate(word) if c == "'"]
        if len(marks) > 1:
            table.update({word[:i] + word[i + 1 :]: word for i in marks})  # "couldnt've"
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    strip_all = _COMMA_NUMBER.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if strip_all or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation form of an answer (see the module docstring):
    ``"Two dogs."`` -> ``"2 dogs"``, ``"The dont"`` -> ``"don't"``, ``"2.5"`` -> ``"2.5"``."""
    if not isinstance(answer, str):
        raise TypeError(f"normalize_answer expects a str, got {type(answer).__name__}")
    text = _process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)
