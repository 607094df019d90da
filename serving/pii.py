"""Mask personal data in texts before they reach the inference log.

What is masked, each replaced by a fixed placeholder so that drift jobs still see that *something*
was there: e-mail addresses, payment card numbers (Luhn-checked), IBANs (mod-97-checked) and phone
numbers.

Why not Presidio: its analyzer needs a spaCy language model that is downloaded at install time
(network), and it would load hundreds of MB into the gateway for four entity types whose formats
are defined by standards. So the detection here is pattern + checksum, with maintained libraries
doing the parts that are easy to get wrong: ``phonenumbers`` (Google's libphonenumber) finds phone
numbers in free text, ``python-stdnum`` checks Luhn and IBAN numbers. The patterns that find the
candidates are written here because neither library scans free text for cards, IBANs or e-mails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn

EMAIL_MASK = "<EMAIL>"
CARD_MASK = "<CARD_NUMBER>"
IBAN_MASK = "<IBAN>"
PHONE_MASK = "<PHONE>"

# Local part and domain as RFC 5322 allows in practice (no quoted local parts: rare and ambiguous in chat).
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
# 13 to 19 digits, optionally grouped by single spaces or dashes (how people type card numbers).
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
# Country code, check digits, then 11 to 30 alphanumerics, optionally in space-separated groups.
_IBAN_CANDIDATE = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}\b")
_SEPARATOR = re.compile(r"[ -]")


@dataclass(frozen=True)
class PiiMasker:
    """Masks PII in a text. ``phone_region`` is the region assumed for numbers written without ``+``."""

    phone_region: str = "US"

    def mask(self, text: str) -> str:
        """The text with every e-mail, card number, IBAN and phone number replaced by a placeholder."""
        text = _EMAIL.sub(EMAIL_MASK, text)
        text = _IBAN_CANDIDATE.sub(_mask_if_iban, text)
        text = _CARD_CANDIDATE.sub(_mask_if_card, text)
        return self._mask_phones(text)

    def _mask_phones(self, text: str) -> str:
        # VALID leniency: the number must fall in a range allocated in its region, which every real
        # number does. POSSIBLE (length only) also took order numbers such as "7731-853" for phone
        # numbers: 38 of the 1,752 sample texts, all false positives, which would then read as drift.
        matches = list(
            phonenumbers.PhoneNumberMatcher(text, self.phone_region, leniency=phonenumbers.Leniency.VALID)
        )
        for match in reversed(matches):
            text = text[: match.start] + PHONE_MASK + text[match.end :]
        return text


def _is_card_number(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _is_iban(candidate: str) -> bool:
    # Words that merely look like the start of an IBAN fail the length-per-country and mod-97 checks.
    return stdnum_iban.is_valid(candidate.upper())


def _mask_longest_valid_prefix(
    match: re.Match[str], is_valid: Callable[[str], bool], placeholder: str
) -> str:
    """Mask the longest prefix of the match, cut at a separator, that passes its checksum.

    The candidate patterns are greedy, so "card 4111 1111 1111 1111 2024" first yields 20 digits; the
    card itself is the prefix that validates, and the rest of the text is kept.
    """
    candidate = match.group()
    cuts = [len(candidate)] + [sep.start() for sep in reversed(list(_SEPARATOR.finditer(candidate)))]
    for cut in cuts:
        if is_valid(candidate[:cut]):
            return placeholder + candidate[cut:]
    return candidate


def _mask_if_card(match: re.Match[str]) -> str:
    return _mask_longest_valid_prefix(match, _is_card_number, CARD_MASK)


def _mask_if_iban(match: re.Match[str]) -> str:
    return _mask_longest_valid_prefix(match, _is_iban, IBAN_MASK)


def mask_pii(text: str, phone_region: str = "US") -> str:
    """Convenience wrapper around :class:`PiiMasker` for one text."""
    return PiiMasker(phone_region=phone_region).mask(text)
