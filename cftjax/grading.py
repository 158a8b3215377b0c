"""Answer extraction, answer equivalence and critique-verdict scoring.

Pure functions over strings. Plain numbers are compared exactly here, so GSM8K-style
grading needs nothing beyond the standard library; anything symbolic goes to
math-verify (the optional ``cftjax[eval]`` extra), imported only when needed.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Literal

Verdict = Literal["right", "wrong"]

# math-verify guards parsing and comparison with signal.alarm, which only works in the
# main thread; elsewhere we pass None (no timeout) rather than crash.
_MATH_VERIFY_TIMEOUT_S = 5


# ---------------------------------------------------------------------------------------
# Extraction


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced_content(text: str, open_index: int) -> str | None:
  """Content of the brace group opening at text[open_index] == "{", or None if unclosed.

  Backslash-escaped characters (``\\{``, ``\\}``) do not count as braces.
  """
  depth = 0
  i = open_index
  while i < len(text):
    char = text[i]
    if char == "\\":
      i += 2
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[open_index + 1 : i]
    i += 1
  return None


def _box_argument(text: str, after_command: int) -> str | None:
  """Argument of a \\boxed/\\fbox command ending at after_command, or None."""
  i = after_command
  while i < len(text) and text[i] in " \t":
    i += 1
  if i < len(text) and text[i] == "{":
    content = _braced_content(text, i)
    return content.strip() if content is not None else None
  if i == after_command:  # "\boxed5" is not a command followed by an argument
    return None
  # Brace-less form "\boxed 5": one token, up to whitespace or a closing "$".
  token = re.match(r"[^\s$]+", text[i:])
  return token.group(0) if token else None


def extract_boxed(text: str) -> str | None:
  """Content of the last non-empty ``\\boxed{...}`` / ``\\fbox{...}`` in text, else None.

  Nested braces are matched (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and the
  brace-less form ``\\boxed 5`` gives ``5``. An unclosed or empty box is skipped, so an
  echoed "within \\boxed{}" instruction does not hide an earlier real answer.
  """
  for match in reversed(list(_BOX_COMMAND.finditer(text))):
    content = _box_argument(text, match.end())
    if content:
      return content
  return None


_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?\s*(?P<answer>[^\n]+)", re.IGNORECASE)
_GSM8K_MARKER = re.compile(r"####\s*(?P<answer>[^\n]*)")
# Order matters: a fraction or a comma-grouped number must win over its leading digits.
_NUMBER = re.compile(r"(?P<sign>-)?(?P<number>\d+/\d+|\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?)")


def _strip_answer_phrase(answer: str) -> str:
  """Trim sentence punctuation, markdown bold and $...$ around a stated answer."""
  answer = re.split(r"\.(?:\s|$)", answer.strip(), maxsplit=1)[0]  # first sentence
  answer = answer.strip().strip("*").strip()
  if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
    answer = answer.strip("$").strip()
  return answer.rstrip(".").strip()


def _last_number(text: str) -> str | None:
  last = None
  for match in _NUMBER.finditer(text):
    last = match
  if last is None:
    return None
  sign_index = last.start("sign")
  # "5-3" is a subtraction, not the number -3.
  signed = last.group("sign") and (sign_index == 0 or not text[sign_index - 1].isalnum())
  return ("-" if signed else "") + last.group("number")


def extract_answer(text: str) -> str | None:
  """The model's final answer in text, or None when nothing parseable is there.

  Tried in order: the last \\boxed{}; the last "the answer is X" / "The final answer
  is X"; the last GSM8K-style "#### X"; the last number (signed, decimal, "1,234",
  or a simple fraction "3/4").
  """
  boxed = extract_boxed(text)
  if boxed is not None:
    return boxed
  for pattern in (_ANSWER_IS, _GSM8K_MARKER):
    matches = list(pattern.finditer(text))
    if matches:
      answer = _strip_answer_phrase(matches[-1].group("answer"))
      if answer:
        return answer
  return _last_number(text)


# ---------------------------------------------------------------------------------------
# Normalisation and equivalence

_UNIT_WORDS = (
    "dollars?|cents?|euros?|pounds?|lbs?|kg|grams?|mg|kilograms?|ounces?|oz|"
    "cm|mm|km|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|feet|foot|ft|"
    "yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|"
    "years?|degrees?|units?|square|sq|cubic|liters?|litres?|ml|gallons?|people|students|"
    "apples|points|percent"
)
# Inside \text{} single letters are units too ("5\text{ m}"); bare trailing words must be
# longer so "3m" or "2 g" in an expression are left alone.
_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:(?:" + _UNIT_WORDS + r"|m|g|in)\s*)+\}(?:\^\{?\d\}?)?")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])(?:\s+(?:" + _UNIT_WORDS + r")\b\.?)+$", re.IGNORECASE)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_LEADING_VARIABLE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(answer: str) -> str:
  """Light, conservative normalisation for string comparison of final answers.

  Removes $ and \\$, spaces, a trailing ".", units ("18 dollars", "5\\text{ cm}",
  degrees), percent signs, a leading "x =", thousands commas and a trailing ".0";
  maps \\dfrac/\\tfrac to \\frac and unwraps \\text{...}. Only for comparing final
  answers: dropping "%" and "x =" follows the usual grading convention (10% == 10).
  """
  s = answer.strip()
  s = s.replace("\\$", "").replace("$", "")
  s = re.sub(r"\\[dt]frac", r"\\frac", s)
  s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
  s = re.sub(r"\\[,;:! ]", " ", s)  # LaTeX spacing commands
  s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
  s = s.replace("\\%", "").replace("%", "")
  s = _TEXT_UNIT.sub("", s)
  s = s.strip().rstrip(".").strip()
  s = _TRAILING_UNIT.sub("", s)
  s = _TEXT_WRAPPER.sub(r"\1", s)
  s = _LEADING_VARIABLE.sub("", s)
  s = re.sub(r"\s+", "", s)
  if _THOUSANDS_NUMBER.fullmatch(s):
    s = s.replace(",", "")
  s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
  return s.rstrip(".")


_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?|[-+]?\.\d+")
_LATEX_FRACTION = re.compile(r"(?P<sign>-)?\\frac\{(?P<num>-?\d+(?:\.\d+)?)\}\{(?P<den>-?\d+(?:\.\d+)?)\}")


def _as_number(normalized: str) -> Fraction | None:
  """Exact value of a normalised plain number, "a/b" or "\\frac{a}{b}", else None."""
  try:
    if _PLAIN_NUMBER.fullmatch(normalized):
      return Fraction(normalized)
    numerator, slash, denominator = normalized.partition("/")
    if slash and _PLAIN_NUMBER.fullmatch(numerator) and _PLAIN_NUMBER.fullmatch(denominator):
      return Fraction(numerator) / Fraction(denominator)
    match = _LATEX_FRACTION.fullmatch(normalized)
    if match:
      value = Fraction(match["num"]) / Fraction(match["den"])
      return -value if match["sign"] else value
  except ZeroDivisionError:
    return None
  return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
  # Exact for anything written in decimal or fraction form; the relative slack only
  # absorbs long float reprs such as 0.30000000000000004.
  return a == b or abs(a - b) <= Fraction(1, 10**9) * max(abs(a), abs(b))


def _import_math_verify():
  """(parse, verify, TimeoutException) from math-verify, or a clear ImportError."""
  try:
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
  except ImportError as error:
    raise ImportError(
        "Comparing non-numeric answers needs math-verify; install it with " "pip install 'cftjax[eval]'"
    ) from error
  return parse, verify, TimeoutException


def _strip_math_delimiters(answer: str) -> str:
  s = answer.strip()
  if s.startswith("$") and s.endswith("$"):
    s = s.strip("$")
  return s.strip().rstrip(".").strip()


def _symbolically_equal(predicted: str, reference: str) -> bool:
  """math-verify equivalence; any error or timeout counts as no match."""
  parse, verify, timeout_exception = _import_math_verify()
  in_main_thread = threading.current_thread() is threading.main_thread()
  timeout_s = _MATH_VERIFY_TIMEOUT_S if in_main_thread else None
  try:
    # Boxing tells math-verify exactly which expression is the answer (its README's
    # advice for gold); the gold must be the first argument of verify.
    gold = parse("\\boxed{" + _strip_math_delimiters(reference) + "}", parsing_timeout=timeout_s)
    target = parse("\\boxed{" + _strip_math_delimiters(predicted) + "}", parsing_timeout=timeout_s)
    if not gold or not target:
      return False
    return bool(verify(gold, target, timeout_seconds=timeout_s))
  # A grader must grade, never crash the run; TimeoutException is a BaseException.
  except (Exception, timeout_exception):  # noqa: BLE001
    return False


def answers_match(predicted: str | None, reference: str) -> bool:
  """Whether predicted is the same final answer as reference.

  None (no answer found) never matches. Normalised strings that are equal match; two
  plain numbers (integers, decimals, "a/b", "\\frac{a}{b}") match iff equal in value,
  without needing math-verify. Everything else is decided by math-verify, where an
  error or timeout counts as no match; if math-verify is not installed that path raises
  ImportError naming the ``cftjax[eval]`` extra.
  """
  if predicted is None:
    return False
  predicted_norm = normalize_answer(predicted)
  reference_norm = normalize_answer(reference)
  if not predicted_norm:
    return False
  if predicted_norm == reference_norm:
    return True
  predicted_value = _as_number(predicted_norm)
  reference_value = _as_number(reference_norm)
  if predicted_value is not None and reference_value is not None:
    return _numbers_equal(predicted_value, reference_value)
  return _symbolically_equal(predicted, reference)


def parse_gsm8k_reference(answer_field: str) -> str:
  """The final answer of a GSM8K answer field: the text after the last "####", no commas."""
  _, marker, tail = answer_field.rpartition("####")
  if not marker:
    raise ValueError("GSM8K answer has no '####' final-answer marker")
  reference = tail.strip().replace(",", "")
  if not reference:
    raise ValueError("GSM8K answer has nothing after '####'")
  return reference


# ---------------------------------------------------------------------------------------
# Critique verdicts

_VERDICT_WORDS = {"right": "right", "correct": "right", "wrong": "wrong", "incorrect": "wrong"}
_VERDICT = re.compile(
    r"conclusion\s*:\s*[*_`\s]*(?P<concl>right|wrong|correct|incorrect)\b"
    r"|\\boxed\{\s*(?:\\text\{\s*)?(?P<boxed>right|wrong|correct|incorrect)\s*\}",
    re.IGNORECASE,
)


def parse_verdict(critique_text: str) -> Verdict | None:
  """Verdict of a critique: from its last "Conclusion: right|wrong" (also
  correct/incorrect, any case) or \\boxed{right|wrong}; None if there is none."""
  matches = list(_VERDICT.finditer(critique_text))
  if not matches:
    return None
  word = matches[-1].group("concl") or matches[-1].group("boxed")
  return _VERDICT_WORDS[word.lower()]  # type: ignore[return-value]


def _ratio(numerator: int, denominator: int) -> float:
  """numerator / denominator, or 0.0 where that is undefined."""
  return numerator / denominator if denominator else 0.0


def critique_scores(predicted_verdicts: list[str | None], labels: list[str]) -> dict:
  """Scores of predicted critique verdicts against true labels ("right"/"wrong").

  The positive class is "wrong" (the critic's job is to catch wrong responses):
  tp = said wrong & is wrong, fp = said wrong & is right, fn = is wrong & not said wrong
  (an unparsed verdict included), tn = said right & is right. An unparsed (None) verdict
  counts as an error for accuracy; on a right response it is in neither fp nor tn, so
  tp + fp + fn + tn + (unparsed on right responses) == n. Precision, recall and F1 are
  0.0 when their denominator is 0 (no wrong predicted / no wrong labels / both 0).
  """
  if len(predicted_verdicts) != len(labels):
    raise ValueError(f"critique_scores: {len(predicted_verdicts)} verdicts but {len(labels)} labels")
  if not labels:
    raise ValueError("critique_scores: no examples to score")
  tp = fp = fn = tn = unparsed = 0
  for index, (verdict, label) in enumerate(zip(predicted_verdicts, labels)):
    if label not in ("right", "wrong"):
      raise ValueError(f"critique_scores: labels[{index}] is {label!r}, not 'right' or 'wrong'")
    if verdict not in ("right", "wrong", None):
      raise ValueError(f"critique_scores: predicted_verdicts[{index}] is {verdict!r}, " "not 'right', 'wrong' or None")
    if verdict is None:
      unparsed += 1
    if label == "wrong":
      if verdict == "wrong":
        tp += 1
      else:
        fn += 1
    elif verdict == "wrong":
      fp += 1
    elif verdict == "right":
      tn += 1
  n = len(labels)
  precision = _ratio(tp, tp + fp)
  recall = _ratio(tp, tp + fn)
  return {
      "accuracy": (tp + tn) / n,
      "precision": precision,
      "recall": recall,
      "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
      "unparsed_rate": unparsed / n,
      "n": n,
      "tp": tp,
      "fp": fp,
      "fn": fn,
      "tn": tn,
      "unparsed": unparsed,
  }


def math_scores(verdicts: list[bool]) -> dict:
  """Accuracy summary of per-example correctness: accuracy, n, correct."""
  if not verdicts:
    raise ValueError("math_scores: no examples to score")
  correct = sum(1 for verdict in verdicts if verdict)
  return {"accuracy": correct / len(verdicts), "n": len(verdicts), "correct": correct}
