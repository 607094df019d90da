"""Mask personal data in texts before they reach the inference log and the drift reference.

Each kind is replaced by its own placeholder, so that drift jobs still see that *something* was there:

- e-mail addresses;
- payment card numbers: 13 to 19 digits that pass the Luhn check and start like a card network's
  numbers (2221-2720, 30, 34-38, 4, 5, 6), which keeps most Luhn-valid tracking numbers readable;
- IBANs, mod-97-checked;
- phone numbers, as Google's libphonenumber finds them at VALID leniency (``phone_region`` for numbers
  written without ``+``);
- national id numbers, each checked by python-stdnum. Anywhere in a text: a US SSN written in its 3-2-4
  grouping ("123-45-6789"), a Spanish DNI/NIE, an Italian codice fiscale, a French NIR, a Belgian
  national number written as on the card ("85.07.30-033.28"). Only right after a word that names the
  number ("SSN", "BSN", "PESEL", "Steuer-ID", "national number", ...): bare 9 and 11 digit numbers
  (SSN, Dutch BSN, Polish PESEL, German IdNr, Belgian national number), because without that word they
  cannot be told from order numbers (one 9-digit number in eleven passes the BSN check);
- dates of birth: any date right after a birth word ("born on", "DOB:", "date of birth is",
  "birthday", ...), with or without a year; and, without such a word, a full date whose year is at
  least 16 years back (a customer's date of birth is the usual reason for such a date in a support
  chat; orders, deliveries and renewals are recent). So "my order from 12/03/2025" stays readable,
  but "customer since 04/05/2001" is masked too: the known false positive of this rule. Other full
  dates are kept as written and kept away from the phone and id detectors;
- passport numbers: 6 to 10 letters and digits (at least two digits) right after "passport" (or its
  French, Spanish, Italian, German, Dutch name), with only "no", "number", "is", ":" and the like in
  between. Without that word a passport number looks like any order or product code;
- IP addresses, v4 and v6, as the ``ipaddress`` module parses them, except dotted quads after
  "version", "build", "release", "firmware", "section" (app versions such as "1.2.3.4"); a port
  stays ("<IP_ADDRESS>:8080");
- postal addresses: a street line ("42 Elm Street", "221B Baker St.", "350 5th Ave") with its unit and,
  after a comma, city and ZIP or postcode; a German one ("Hauptstraße 5, 10115 Berlin"); "PO Box 123".
  A postcode or city alone is kept. See ``_STREET`` for why this is a pattern and not a library.

Digits are matched after folding every Unicode decimal digit and compatibility form (full-width
"４１１１", "＋", "－", no-break and zero-width spaces) to ASCII, one character for one character, so the
positions found map back onto the original text and everything that is not masked is kept byte for
byte. Digit groups may be separated by spaces, dashes and dots, mixed ("4111 1111-1111.1111").
Masking is idempotent: placeholders already in a text are left alone and never count as context.

Why not Presidio: its analyzer needs a spaCy language model that is downloaded at install time
(network), and it would load hundreds of MB into the gateway for entity types whose formats are
mostly defined by standards. So the detection here is pattern + checksum + context word, with
maintained libraries doing the parts that are easy to get wrong: ``phonenumbers`` finds phone numbers
in free text, ``python-stdnum`` checks Luhn, IBAN and national id numbers, ``ipaddress`` parses IPs.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.be import nn as be_nn
from stdnum.de import idnr as de_idnr
from stdnum.es import dni as es_dni
from stdnum.es import nie as es_nie
from stdnum.fr import nir as fr_nir
from stdnum.it import codicefiscale as it_codicefiscale
from stdnum.nl import bsn as nl_bsn
from stdnum.pl import pesel as pl_pesel
from stdnum.us import ssn as us_ssn

EMAIL_MASK = "<EMAIL>"
CARD_MASK = "<CARD_NUMBER>"
IBAN_MASK = "<IBAN>"
PHONE_MASK = "<PHONE>"
NATIONAL_ID_MASK = "<NATIONAL_ID>"
DATE_OF_BIRTH_MASK = "<DATE_OF_BIRTH>"
PASSPORT_MASK = "<PASSPORT>"
IP_ADDRESS_MASK = "<IP_ADDRESS>"
ADDRESS_MASK = "<ADDRESS>"

# Kind name -> placeholder: what reports and tests count by.
MASK_BY_KIND: dict[str, str] = {
    "email": EMAIL_MASK,
    "card": CARD_MASK,
    "iban": IBAN_MASK,
    "phone": PHONE_MASK,
    "national_id": NATIONAL_ID_MASK,
    "date_of_birth": DATE_OF_BIRTH_MASK,
    "passport": PASSPORT_MASK,
    "ip_address": IP_ADDRESS_MASK,
    "address": ADDRESS_MASK,
}
_PLACEHOLDER = re.compile("|".join(re.escape(mask) for mask in MASK_BY_KIND.values()))

# What an earlier detector took is overwritten with this in the scanned copy: not a digit, letter,
# space or separator, so no later pattern matches into it or joins numbers across it.
_BLANK = "\x00"
# Words allowed between a context word and the value it announces ("passport number is: X1234567").
_FILLER = r"(?:[^\w\x00]+|(?:no|nr|num|number|id|is|was|are|reads|my|on|the|of|in|at|code)\b)*?"

# Local part and domain as RFC 5322 allows in practice (no quoted local parts: rare and ambiguous in chat).
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
# One separator between digit groups: a space, or a dash or dot with optional spaces around it.
_DIGIT_SEPARATOR = r"(?:[ ]?[.\-\u2010-\u2015][ ]?|[ ])"
# 13 or more digits in groups: card numbers and French NIRs (13 + 2 check digits). Longer runs are
# cut down to their longest valid slice ("qty 2 4111 1111 1111 1111 2024").
_LONG_DIGIT_RUN = re.compile(rf"(?<![\w.\-])\d(?:{_DIGIT_SEPARATOR}?\d){{12,40}}(?!\w|[.\-]\d)")
_SEPARATOR_RUN = re.compile(_DIGIT_SEPARATOR)
_CARD_OR_NIR_LENGTHS = range(13, 20)
_IBAN_LENGTHS = range(15, 35)
# Country code, check digits, then 11 to 30 alphanumerics, optionally in space-separated groups.
_IBAN_CANDIDATE = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}\b")
_SEPARATOR = re.compile(r"[ ]")

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV4_NOT_AN_ADDRESS_BEFORE = re.compile(
    r"\b(?:version|ver|build|release|firmware|update|section|chapter|step|v)\W{0,3}$", re.IGNORECASE
)
# Hex groups and colons with at least one digit (so "add::bed" is not read as an address), an optional
# dotted-quad tail and zone; ipaddress decides.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f:.]*\d)(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.]+)?(?![\w:])"
)

# "INV-2025-000123": digits joined to a word by a dash or slash are part of a reference, not a phone.
_PART_OF_A_CODE_BEFORE = re.compile(r"[A-Za-z0-9][\-/_]$")

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_MONTH_NUMBER = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_DATE = re.compile(
    rf"""(?<![\w./\-])(?:
        (?P<a>\d{{1,2}})(?P<sep>[./\-])(?P<b>\d{{1,2}})(?:(?P=sep)(?P<year_ab>\d{{4}}|\d{{2}}))?
      | (?P<iso_year>\d{{4}})(?P<iso_sep>[./\-])(?P<iso_month>\d{{1,2}})(?P=iso_sep)(?P<iso_day>\d{{1,2}})
      | (?P<day_dm>{_DAY})(?:st|nd|rd|th)?(?:\s+of)?\s+(?P<month_dm>{_MONTH})\.?(?:,?\s+(?P<year_dm>\d{{4}}))?
      | (?P<month_md>{_MONTH})\.?\s+(?P<day_md>{_DAY})(?:st|nd|rd|th)?(?:,?\s+(?P<year_md>\d{{4}}))?
    )(?!\w|[./\-]\d)""",
    re.IGNORECASE | re.VERBOSE,
)
_BIRTH_CONTEXT = re.compile(
    r"\b(?:born|dob|d\.o\.b|date\s+of\s+birth|birth\s*date|birthday|b-?day|geboren|geburtsdatum|"
    r"née|né|nacid[oa]|fecha\s+de\s+nacimiento|date\s+de\s+naissance)\b\.?" + _FILLER + r"$",
    re.IGNORECASE,
)
# People are rarely under 16 in a support chat, and a date that old is rarely anything but a birth date.
_MIN_AGE_YEARS = 16

_SSN_GROUPED = re.compile(r"(?<![\w.\-])\d{3}(?P<sep>[ .\-])\d{2}(?P=sep)\d{4}(?!\w|[.\-]\d)")
_BELGIAN_NUMBER_AS_PRINTED = re.compile(r"(?<![\w.\-])\d{2}\.\d{2}\.\d{2}-\d{3}\.\d{2}(?!\w|[.\-]\d)")
_SPANISH_ID = re.compile(r"(?<![\w\-])(?:[XYZxyz]-?)?\d{7,8}-?[A-Za-z](?!\w)")
_ITALIAN_FISCAL_CODE = re.compile(
    r"(?<!\w)[A-Za-z]{6}[A-Za-z0-9]{2}[A-Za-z][A-Za-z0-9]{2}[A-Za-z][A-Za-z0-9]{3}[A-Za-z](?!\w)"
)
_NATIONAL_ID_CONTEXT = re.compile(
    r"\b(?:ssn|social\s+security(?:\s+number)?|bsn|burgerservicenummer|pesel|steuer-?id|idnr|"
    r"steuerliche\s+identifikationsnummer|tax\s+id(?:entification)?(?:\s+number)?|nir|insee|"
    r"num[ée]ro\s+de\s+s[ée]curit[ée]\s+sociale|rijksregisternummer|num[ée]ro\s+national|"
    r"national\s+(?:id(?:entity)?|register|registration)?\s*number|national\s+id)\b",
    re.IGNORECASE,
)
_CONTEXT_DIGITS = re.compile(
    _FILLER + rf"(?<![\w.\-])(?P<id>\d(?:{_DIGIT_SEPARATOR}?\d){{8,14}})(?!\w|[.\-]\d)", re.IGNORECASE
)

_PASSPORT = re.compile(
    r"\b(?:passport|passeport|pasaporte|passaporto|reisepass|paspoort)s?\b"
    + _FILLER
    + r"(?<![\w\-])(?P<id>(?=(?:[A-Za-z]*\d){2})[A-Za-z0-9]{6,10})(?![\w\-])",
    re.IGNORECASE,
)

# Street addresses: a documented pattern, not a library. pyap (the one maintained-looking finder for
# US/CA/GB addresses in free text, last released 2020) found no address written in lower case
# ("i live at 350 fifth avenue, new york, ny 10118"), none without city and ZIP ("42 Elm Street
# apt 5"), and took about 1 ms a text; usaddress parses a string already known to be an address and
# does not find one in a sentence. So: house number, one to three name words, a street type (USPS and
# Royal Mail suffixes), then optionally a unit, and after a comma a city with a ZIP or postcode. A
# lower-case street only counts after an address word ("ship to", "live at", "my address is"), else
# "a 15 minute drive" would be an address.
_STREET_TYPE = (
    r"(?:street|st|avenue|ave|road|rd|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|way|"
    r"parkway|pkwy|terrace|close|crescent|square|sq|highway|hwy|circle|trail|row|mews|gardens|grove|"
    r"walk|alley|plaza)"
)
_POSTCODE = (
    r"(?:\d{5}(?:-\d{4})?"  # US ZIP, ZIP+4
    r"|[A-Za-z]{1,2}\d[A-Za-z\d]?\s?\d[A-Za-z]{2}"  # UK
    r"|[A-Za-z]\d[A-Za-z]\s?\d[A-Za-z]\d)"  # Canada
)
# One to three words, no sentence punctuation: "Mountain View", "Stratford-upon-Avon".
_CITY = r"[A-Za-z](?:[A-Za-z'\-]*[A-Za-z])?(?: [A-Za-z](?:[A-Za-z'\-]*[A-Za-z])?){0,2}"
_ADDRESS_TAIL = (
    r"(?:,?\s+(?:apt|apartment|suite|ste|unit|flat|fl)\.?\s*#?\s?[\w-]{1,5}|,?\s+\#\s?\d{1,5})?"
    rf"(?:,\s*{_CITY},?\s*(?:[A-Za-z]{{2}}\s+)?{_POSTCODE}(?!\w))?"
)
_STREET = re.compile(
    r"(?<![\w.,\-])(?:(?:flat|apt|apartment|unit|suite)\s*#?\s?\d{1,4}[A-Za-z]?,?\s+)?"
    r"(?P<number>\d{1,5}[A-Za-z]?(?:-\d{1,5})?)\s+"
    r"(?P<name>(?:(?:[A-Za-z][A-Za-z'\-]*|\d{1,3}(?:st|nd|rd|th))\s+){1,3}?)"
    rf"(?P<type>{_STREET_TYPE})\b(?:\.(?=,))?(?-i:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?" + _ADDRESS_TAIL,
    re.IGNORECASE,
)
# German order, name then number: "Hauptstraße 5", "Lindenweg 12a, 10115 Berlin". Case-sensitive:
# German street names are capitalised, and "during 5 minutes" must not end in a street type.
_GERMAN_STREET = re.compile(
    r"\b[A-ZÄÖÜ][a-zäöüß\-]*(?:straße|strasse|str\.|weg|allee|platz|gasse|damm|ufer)\s+\d{1,4}\s?[a-z]?\b"
    r"(?:,\s*\d{5}\s+[A-ZÄÖÜ][a-zäöüß\-]+)?"
)
_PO_BOX = re.compile(r"\bp\.?\s?o\.?\s?box\s+\d{1,6}\b" + _ADDRESS_TAIL, re.IGNORECASE)
_ADDRESS_CONTEXT = re.compile(
    r"\b(?:address|addr|live[sd]?\s+at|living\s+at|reside\s+at|located\s+at|moved\s+to|"
    r"(?:ship|send|sent|deliver|mail|post)(?:ped|ed|ing|s)?\s+(?:it\s+|them\s+)?to)\b" + _FILLER + r"$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PiiMasker:
    """Masks PII in a text. ``phone_region`` is the region assumed for numbers written without ``+``."""

    phone_region: str = "US"

    def mask(self, text: str) -> str:
        """The text with every kind of PII listed in the module docstring replaced by its placeholder."""
        scan = _Scan(text)
        for placeholder in _PLACEHOLDER.finditer(scan.text):
            scan.keep(placeholder.start(), placeholder.end())
        for match in _EMAIL.finditer(scan.text):
            scan.mask(match.start(), match.end(), EMAIL_MASK)
        _mask_ip_addresses(scan)
        for match in _IBAN_CANDIDATE.finditer(scan.text):
            _mask_valid_slices(scan, match, _SEPARATOR, _IBAN_LENGTHS, [(_is_iban, IBAN_MASK)])
        _mask_dates_of_birth(scan)
        _mask_national_ids(scan)
        for match in _LONG_DIGIT_RUN.finditer(scan.text):
            _mask_valid_slices(
                scan,
                match,
                _SEPARATOR_RUN,
                _CARD_OR_NIR_LENGTHS,
                [(_is_card_number, CARD_MASK), (_is_nir, NATIONAL_ID_MASK)],
            )
        for match in _PASSPORT.finditer(scan.text):
            scan.mask(match.start("id"), match.end("id"), PASSPORT_MASK)
        _mask_addresses(scan)
        self._mask_phones(scan)
        return scan.result()

    def _mask_phones(self, scan: _Scan) -> None:
        # VALID leniency: the number must fall in a range allocated in its region, which every real
        # number does. POSSIBLE (length only) also took order numbers such as "7731-853" for phone
        # numbers: 38 of the 1,752 sample texts, all false positives, which would then read as drift.
        # The matcher reads "+1 415 555 2671 415.555-2671" as one candidate and finds only the second
        # number in it; with that one blanked, another pass finds the first.
        for _ in range(3):
            found = False
            for match in phonenumbers.PhoneNumberMatcher(
                scan.text, self.phone_region, leniency=phonenumbers.Leniency.VALID
            ):
                if not _PART_OF_A_CODE_BEFORE.search(scan.text, max(0, match.start - 2), match.start):
                    scan.mask(match.start, match.end, PHONE_MASK)
                    found = True
            if not found:
                return


class _Scan:
    """One text being masked.

    Detectors read ``text``: the original with digits folded to ASCII and what an earlier detector
    took blanked out, always as long as the original, so a span found there is the same span in it.
    """

    def __init__(self, original: str) -> None:
        self.original = original
        self.text = _fold(original)
        self._masked: list[tuple[int, int, str]] = []

    def mask(self, start: int, end: int, placeholder: str) -> None:
        if self._take(start, end):
            self._masked.append((start, end, placeholder))

    def keep(self, start: int, end: int) -> None:
        """Keep later detectors off a span that stays as written (an order date is no phone number)."""
        self._take(start, end)

    def _take(self, start: int, end: int) -> bool:
        if start >= end or _BLANK in self.text[start:end]:
            return False
        self.text = self.text[:start] + _BLANK * (end - start) + self.text[end:]
        return True

    def result(self) -> str:
        parts: list[str] = []
        last = 0
        for start, end, placeholder in sorted(self._masked):
            parts += [self.original[last:start], placeholder]
            last = end
        parts.append(self.original[last:])
        return "".join(parts)


def _fold(text: str) -> str:
    if text.isascii():
        return text
    return "".join(_fold_char(char) for char in text)


@functools.lru_cache(maxsize=4096)
def _fold_char(char: str) -> str:
    """One character for one: any script's decimal digit as ASCII, compatibility forms as NFKC has them."""
    digit = unicodedata.decimal(char, None)
    if digit is not None:
        return str(digit)
    if unicodedata.category(char) == "Cf":  # zero-width spaces and joiners typed inside numbers
        return " "
    folded = unicodedata.normalize("NFKC", char)
    return folded if len(folded) == 1 else char


def _mask_valid_slices(
    scan: _Scan,
    match: re.Match[str],
    separator: re.Pattern[str],
    lengths: range,
    checks: Sequence[tuple[Callable[[str], bool], str]],
) -> None:
    """Mask the longest slice of the match, cut at separators, that passes one of the checks; then
    the same in what is left on either side.

    The candidate patterns are greedy, so "card 4111 1111 1111 1111 2024" first yields 20 digits; the
    card itself is the slice that validates, and the rest of the text is kept. Only slices whose length
    without separators is in ``lengths`` are checked, which keeps long runs of digits cheap.
    """
    candidate = match.group()
    separators = list(separator.finditer(candidate))
    boundaries = [(0, 0)] + [(sep.start(), sep.end()) for sep in separators] + [(len(candidate),) * 2]
    # compact[k]: characters other than separators before boundary k.
    compact = [0]
    for previous, current in zip(boundaries, boundaries[1:], strict=False):
        compact.append(compact[-1] + current[0] - previous[1])
    pending = [(0, len(boundaries) - 1)]  # ranges of boundary indices still to search
    while pending:
        first, last = pending.pop()
        slices = sorted(
            (
                (i, j)
                for i in range(first, last)
                for j in range(i + 1, last + 1)
                if compact[j] - compact[i] in lengths
            ),
            key=lambda pair: compact[pair[0]] - compact[pair[1]],
        )
        for i, j in slices:
            start, end = boundaries[i][1], boundaries[j][0]
            placeholder = next((mask for is_valid, mask in checks if is_valid(candidate[start:end])), None)
            if placeholder is not None:
                scan.mask(match.start() + start, match.start() + end, placeholder)
                pending += [(first, i), (j, last)]
                break


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _is_card_number(candidate: str) -> bool:
    digits = _digits(candidate)
    # Issuer prefixes of Visa, Mastercard (51-55, 2221-2720), Amex, Diners, JCB, Discover, UnionPay, Maestro.
    issued = (
        digits[:1] in {"4", "5", "6"}
        or digits[:2] in {"30", "34", "35", "36", "37", "38"}
        or 2221 <= int(digits[:4] or 0) <= 2720
    )
    return issued and 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _is_nir(candidate: str) -> bool:
    # stdnum checks length and key; the first digit is the sex (1, 2) or a temporary number (7, 8).
    digits = _digits(candidate)
    return len(digits) == 15 and digits[0] in "1278" and fr_nir.is_valid(digits)


def _is_iban(candidate: str) -> bool:
    # Words that merely look like the start of an IBAN fail the length-per-country and mod-97 checks.
    return stdnum_iban.is_valid(candidate.upper())


def _mask_ip_addresses(scan: _Scan) -> None:
    for match in _IPV6.finditer(scan.text):
        if _parses_as_ip(match.group()):
            scan.mask(match.start(), match.end(), IP_ADDRESS_MASK)
    for match in _IPV4.finditer(scan.text):
        before = scan.text[max(0, match.start() - 16) : match.start()]
        if _parses_as_ip(match.group()) and not _IPV4_NOT_AN_ADDRESS_BEFORE.search(before):
            scan.mask(match.start(), match.end(), IP_ADDRESS_MASK)


def _parses_as_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _mask_dates_of_birth(scan: _Scan) -> None:
    this_year = dt.date.today().year
    for match in _DATE.finditer(scan.text):
        parsed = _parse_date(match)
        if parsed is None:
            continue
        year, is_full = parsed
        after_birth_word = _BIRTH_CONTEXT.search(scan.text, max(0, match.start() - 60), match.start())
        said_to_be_birth = after_birth_word is not None and (year is None or year <= this_year)
        old_enough = is_full and year is not None and 1900 <= year <= this_year - _MIN_AGE_YEARS
        if said_to_be_birth or old_enough:
            scan.mask(match.start(), match.end(), DATE_OF_BIRTH_MASK)
        elif is_full:
            scan.keep(match.start(), match.end())


def _parse_date(match: re.Match[str]) -> tuple[int | None, bool] | None:
    """(four-digit year or None, whether day, month and a four-digit year are all there), None if no date."""
    groups = match.groupdict()
    if groups["a"] is not None:
        first, second = int(groups["a"]), int(groups["b"])
        year_text = groups["year_ab"]
        year = int(year_text) if year_text and len(year_text) == 4 else None
        # Day-month or month-day: either reading that is a real date will do.
        if not (_is_date(year, second, first) or _is_date(year, first, second)):
            return None
        return year, year is not None
    if groups["iso_year"] is not None:
        year = int(groups["iso_year"])
        if not _is_date(year, int(groups["iso_month"]), int(groups["iso_day"])):
            return None
        return year, True
    month_name = groups["month_dm"] or groups["month_md"]
    day = int(groups["day_dm"] or groups["day_md"])
    year_text = groups["year_dm"] or groups["year_md"]
    year = int(year_text) if year_text else None
    if not _is_date(year, _MONTH_NUMBER[month_name[:3].lower()], day):
        return None
    return year, year is not None


def _is_date(year: int | None, month: int, day: int) -> bool:
    try:
        dt.date(year or 2000, month, day)  # 2000: a leap year, so 29 February passes without a year
    except ValueError:
        return False
    return True


def _mask_national_ids(scan: _Scan) -> None:
    for match in _SSN_GROUPED.finditer(scan.text):
        if us_ssn.is_valid(_digits(match.group())):
            scan.mask(match.start(), match.end(), NATIONAL_ID_MASK)
    for match in _BELGIAN_NUMBER_AS_PRINTED.finditer(scan.text):
        if be_nn.is_valid(match.group()):
            scan.mask(match.start(), match.end(), NATIONAL_ID_MASK)
    for match in _SPANISH_ID.finditer(scan.text):
        if es_dni.is_valid(match.group()) or es_nie.is_valid(match.group()):
            scan.mask(match.start(), match.end(), NATIONAL_ID_MASK)
    for match in _ITALIAN_FISCAL_CODE.finditer(scan.text):
        if any(char.isdigit() for char in match.group()) and it_codicefiscale.is_valid(match.group()):
            scan.mask(match.start(), match.end(), NATIONAL_ID_MASK)
    for context in _NATIONAL_ID_CONTEXT.finditer(scan.text):
        number = _CONTEXT_DIGITS.match(scan.text, context.end())
        if number and _is_named_national_id(number.group("id")):
            scan.mask(number.start("id"), number.end("id"), NATIONAL_ID_MASK)


def _is_named_national_id(candidate: str) -> bool:
    digits = _digits(candidate)
    if len(digits) == 9:
        return us_ssn.is_valid(digits) or nl_bsn.is_valid(digits)
    if len(digits) == 11:
        return pl_pesel.is_valid(digits) or de_idnr.is_valid(digits) or be_nn.is_valid(digits)
    return _is_nir(digits)


def _mask_addresses(scan: _Scan) -> None:
    for match in _GERMAN_STREET.finditer(scan.text):
        scan.mask(match.start(), _end_without_space(match), ADDRESS_MASK)
    for match in _PO_BOX.finditer(scan.text):
        scan.mask(match.start(), _end_without_space(match), ADDRESS_MASK)
    for match in _STREET.finditer(scan.text):
        capitalised = all(word[0].isupper() or word[0].isdigit() for word in match.group("name").split())
        if capitalised or _ADDRESS_CONTEXT.search(scan.text, max(0, match.start() - 60), match.start()):
            scan.mask(match.start(), _end_without_space(match), ADDRESS_MASK)


def _end_without_space(match: re.Match[str]) -> int:
    return match.start() + len(match.group().rstrip())


def mask_pii(text: str, phone_region: str = "US") -> str:
    """Convenience wrapper around :class:`PiiMasker` for one text."""
    return PiiMasker(phone_region=phone_region).mask(text)
