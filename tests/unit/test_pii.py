"""PII masking: each kind is masked, checksums keep look-alike numbers, ordinary intent text is untouched."""

from __future__ import annotations

import random

import pytest

from serving.pii import (
    ADDRESS_MASK,
    CARD_MASK,
    DATE_OF_BIRTH_MASK,
    EMAIL_MASK,
    IBAN_MASK,
    IP_ADDRESS_MASK,
    NATIONAL_ID_MASK,
    PASSPORT_MASK,
    PHONE_MASK,
    PiiMasker,
    mask_pii,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+orders@example.co.uk please", f"mail me at {EMAIL_MASK} please"),
        ("J_Smith@mail-server.example.com", EMAIL_MASK),
        # Visa test number, grouped, dashed and bare.
        ("card 4111 1111 1111 1111 was declined", f"card {CARD_MASK} was declined"),
        ("card 4111-1111-1111-1111", f"card {CARD_MASK}"),
        ("pay with 5555555555554444", f"pay with {CARD_MASK}"),
        # Amex (15 digits) in its 4-6-5 grouping.
        ("amex 3782 822463 10005 ok", f"amex {CARD_MASK} ok"),
        # A card followed by more digits: the valid prefix is masked, the rest kept.
        ("card 4111 1111 1111 1111 2024", f"card {CARD_MASK} 2024"),
        ("send it to GB82 WEST 1234 5698 7654 32 thanks", f"send it to {IBAN_MASK} thanks"),
        ("iban DE89370400440532013000.", f"iban {IBAN_MASK}."),
        ("lowercase de89 3704 0044 0532 0130 00", f"lowercase {IBAN_MASK}"),
        ("call +44 20 7946 0958 now", f"call {PHONE_MASK} now"),
        ("my number is (415) 555-2671", f"my number is {PHONE_MASK}"),
        ("ring +49 30 901820", f"ring {PHONE_MASK}"),
        # Full-width digits and mixed separators are folded before matching; the rest stays as typed.
        ("ｃａｒｄ ４１１１ １１１１ １１１１ １１１１", f"ｃａｒｄ {CARD_MASK}"),
        ("card 4111 1111-1111.1111!", f"card {CARD_MASK}!"),
        ("card 4111\u200b1111\u200b1111\u200b1111", f"card {CARD_MASK}"),
        ("ssn 457-90-7841.", f"ssn {NATIONAL_ID_MASK}."),
        ("BSN: 698797309", f"BSN: {NATIONAL_ID_MASK}"),
        ("DNI 83194893-Y", f"DNI {NATIONAL_ID_MASK}"),
        ("born on 12 March 1985", f"born on {DATE_OF_BIRTH_MASK}"),
        ("DOB: 03/12/85", f"DOB: {DATE_OF_BIRTH_MASK}"),
        ("passport no. X1234567", f"passport no. {PASSPORT_MASK}"),
        ("from 203.0.113.9 and 2001:db8::1", f"from {IP_ADDRESS_MASK} and {IP_ADDRESS_MASK}"),
        ("ship to 42 Elm Street, Springfield, IL 62704 asap", f"ship to {ADDRESS_MASK} asap"),
        ("PO Box 77", ADDRESS_MASK),
    ],
)
def test_each_kind_of_pii_is_masked(text: str, expected: str) -> None:
    assert mask_pii(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "where is my order",
        # 16 digits that fail the Luhn check are not a card.
        "tracking 4111 1111 1111 1112",
        # An IBAN-shaped string with wrong check digits is not an IBAN.
        "GB00 WEST 1234 5698 7654 32",
        "order 12345678 arrived on 2024-01-05 at 10:30",
        # Order numbers from the sample data are not phone numbers.
        "I cancelled order 7731-853 before it shipped",
        "payment declined on order 55-20913",
        "I was charged 120.50 twice",
        "promo code SAVE20 does not work",
        "email me@ is broken",
        # Recent dates are orders and deliveries, not birthdays; versions are not IP addresses.
        "my order from 12/03/2025 never arrived",
        "app version 1.2.3.4 crashes",
        "the meeting is at 10:30:45",
        "a 15 minute drive from the store",
        "product code AB1234567",
        "invoice INV-2025-000123 is wrong",
    ],
)
def test_text_without_pii_is_left_alone(text: str) -> None:
    assert mask_pii(text) == text


def test_several_kinds_in_one_text() -> None:
    text = (
        "I'm bob@example.org, card 4012888888881881, phone +1 415 555 2671, "
        "IBAN FR14 2004 1010 0505 0001 3M02 606"
    )
    masked = mask_pii(text)
    assert masked == f"I'm {EMAIL_MASK}, card {CARD_MASK}, phone {PHONE_MASK}, IBAN {IBAN_MASK}"


def test_phone_region_decides_national_numbers() -> None:
    # A German national number is a phone number for a German deployment.
    assert PiiMasker(phone_region="DE").mask("ruf 030 901820 an") == f"ruf {PHONE_MASK} an"


def test_masking_never_raises_on_arbitrary_text() -> None:
    """The log writer masks whatever clients send: random mixes of digits, separators and scripts."""
    rng = random.Random(7)
    alphabet = "0123456789 +-()./@_ abcXYZ\u00e9\u0434\u4e2d\U0001f600\u200b\n"
    masker = PiiMasker()
    for _ in range(2_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert isinstance(masker.mask(text), str)


def test_placeholders_in_the_input_are_kept_and_masking_twice_changes_nothing() -> None:
    text = "passport <PASSPORT> and card 4111 1111 1111 1111, born 1985-03-12"
    once = mask_pii(text)
    assert once == f"passport {PASSPORT_MASK} and card {CARD_MASK}, born {DATE_OF_BIRTH_MASK}"
    assert mask_pii(once) == once


def test_a_run_of_digits_holding_two_numbers_masks_both() -> None:
    # A card and a French NIR, separated only by a space: one candidate, two valid slices.
    text = "4111 1111 1111 1111 175067822160924"
    assert mask_pii(text) == f"{CARD_MASK} {NATIONAL_ID_MASK}"
