"""Hostile inputs to the community's files and commands: each is refused in one line that names the
file (and the key's path in it) or the option, with the documented exit code (1, or 2 for a file
that cannot be used), no traceback, and before the chain is asked: the RPC URL given here has
nothing listening, so a refusal that waited for the chain would say "cannot reach the chain"."""

from __future__ import annotations

from decimal import Decimal, localcontext
from pathlib import Path

import pytest

from daisee_node.cli import main
from daisee_node.community import load_key, parse_key
from daisee_node.community.billing import (
    CommunityError,
    KeyMembersError,
    MemberMonth,
    bill,
    translate_key,
)
from daisee_node.community.commands import MAX_TIME_MS, parse_time
from daisee_node.community.files import Tariff, load_members, load_tariff
from daisee_node.errors import ConfigError, DaiseeError
from tests.support.community import write_members

ALICE, BOB, SOL = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20
CHECKSUMMED_ALICE = "0xA1a1A1A1a1A1A1a1A1a1a1a1A1a1A1A1A1a1a1a1"  # not a valid checksum: any case
NOBODY = "http://127.0.0.1:9"  # the discard port: nothing answers there


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A members file (alice, bob, sol), a prorata key and a tariff in `tmp_path`."""
    names = {ALICE: "alice", BOB: "bob", SOL: "sol"}
    write_members(tmp_path / "members.toml", names)
    (tmp_path / "prorata.toml").write_text('kind = "prorata"\n')
    (tmp_path / "tariff.toml").write_text("local_price = 0.15\n")
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command in this process (an exception would fail the test); its exit code and
    standard error."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def refused(err: str) -> str:
    """The one error line of a refusal made before the chain was asked."""
    assert err.count("\n") == 1 and err.startswith("daisee-node: error: "), err
    assert "cannot reach the chain" not in err and "Traceback" not in err
    return err.strip()


def refused_file(err: str, path: Path) -> list[str]:
    """The problems of a file refused with exit 2: its name first, then each problem's line."""
    head, *problems = err.strip().splitlines()
    assert head.startswith(f"{path}: ") and "Traceback" not in err, err
    assert problems and "cannot reach the chain" not in err
    return [line.removeprefix("  - ") for line in problems]


def chain_args(files: Path) -> list[str]:
    return ["--rpc", NOBODY, "--ledger", ALICE, "--registry", BOB]


def allocate(files: Path, *extra: str) -> list[str]:
    return [
        "community",
        "allocate",
        *chain_args(files),
        "--members",
        str(files / "members.toml"),
        "--key",
        str(files / "prorata.toml"),
        "--from",
        "2026-01-01",
        "--to",
        "2026-01-02",
        *extra,
    ]


def record(files: Path, key: Path, *extra: str) -> list[str]:
    return ["community", "key", "record", str(key), *chain_args(files), *extra]


# -- 1. a member named twice ------------------------------------------------------------------


def test_a_static_key_naming_one_member_by_name_and_by_address_is_refused_with_both_paths(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = files / "twice.toml"
    key.write_text(f'kind = "static"\n[coefficients]\nalice = 0.5\n"{ALICE}" = 0.5\n')
    members = load_members(files / "members.toml")
    with pytest.raises(KeyMembersError) as err:
        translate_key(load_key(key), members.address_of, str(key))
    assert isinstance(err.value, CommunityError) and isinstance(err.value, ConfigError)
    (problem,) = err.value.problems
    assert problem.path == f"coefficients.{ALICE}" and "coefficients.alice" in problem.message

    # Refused before anything is recorded: with the members file, and without it (a key naming
    # members both ways cannot be checked without it).
    code, err_text = cli(capsys, *record(files, key, "--members", str(files / "members.toml")))
    assert code == 2
    (line,) = refused_file(err_text, key)
    assert line.startswith(f"coefficients.{ALICE}: ") and "name each member once" in line
    code, err_text = cli(capsys, *record(files, key, "--from", "2027-01-01"))
    assert code == 1 and "give --members FILE" in refused(err_text)
    # and allocate refuses it too, before reading the chain
    args = allocate(files)
    args[args.index("--key") + 1] = str(key)
    code, err_text = cli(capsys, *args)
    assert code == 2 and refused_file(err_text, key)[0].startswith(f"coefficients.{ALICE}")


def test_tiers_naming_one_member_by_name_and_by_address_are_refused_with_the_path(
    files: Path,
) -> None:
    key = parse_key({"kind": "tiers", "tiers": [["bob", "alice"], ["0x" + ALICE[2:].upper()]]})
    members = load_members(files / "members.toml")
    with pytest.raises(KeyMembersError) as err:
        translate_key(key, members.address_of, "tiers.toml")
    (problem,) = err.value.problems
    assert problem.path == "tiers[1][0]" and "tiers[0][1]" in problem.message


def test_two_spellings_of_one_address_in_a_static_key_are_refused_not_collapsed() -> None:
    # Both spellings are the same node: kept as one entry, the sum check would see 0.5, not 1.
    with pytest.raises(ConfigError) as err:
        parse_key(
            {"kind": "static", "coefficients": {CHECKSUMMED_ALICE: 0.5, ALICE: 0.5}},
            source="k.toml",
        )
    (problem,) = err.value.problems
    assert problem.path == "coefficients" and "name the same member" in problem.message


def test_a_json_key_giving_a_member_twice_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.json"
    key.write_text('{"kind": "static", "coefficients": {"alice": 0.5, "alice": 0.2}}')
    with pytest.raises(ConfigError, match="'alice' is given twice"):
        load_key(key)


# -- 2. an unknown member ---------------------------------------------------------------------


def test_an_unknown_member_names_the_key_file_and_its_path(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = files / "zoe.toml"
    key.write_text('kind = "tiers"\ntiers = [["alice", "zoe"], ["bob"]]\n')
    code, err = cli(capsys, *record(files, key, "--members", str(files / "members.toml")))
    assert code == 2
    assert refused_file(err, key) == ["tiers[0][1]: unknown member 'zoe' (not in the members file)"]
    static = files / "static.toml"
    static.write_text(f'kind = "static"\n[coefficients]\n"{SOL[:-1]}9" = 0.5\n')
    args = allocate(files)
    args[args.index("--key") + 1] = str(static)
    code, err = cli(capsys, *args)
    (line,) = refused_file(err, static)
    assert code == 2 and line.startswith(f"coefficients.{SOL[:-1]}9: unknown member")


# -- 3. coefficients too long to read ------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["1e-9999999", "1e-999999999", "1e-9_999_999", "1e-４４", "1" * 41, "1/" + "3" * 41]
)
def test_a_coefficient_too_long_or_too_precise_is_refused_with_its_path(
    tmp_path: Path, text: str
) -> None:
    key = tmp_path / "k.toml"
    key.write_text(f'kind = "static"\n[coefficients]\nalice = "{text}"\n')
    with pytest.raises(ConfigError) as err:
        load_key(key)
    (problem,) = err.value.problems
    assert problem.path == "coefficients.alice"
    assert "too long" in problem.message or "not a number" in problem.message


def test_coefficients_within_the_bounds_still_read_exactly() -> None:
    key = parse_key(
        {"kind": "static", "coefficients": {"a": "1e-40", "b": "25%", "c": "1/3", "d": 0.1}}
    )
    assert key.canonical()["coefficients"] == {  # type: ignore[union-attr]
        "a": "1/" + "1" + "0" * 40,
        "b": "1/4",
        "c": "1/3",
        "d": "1/10",
    }


# -- 4. key record: its start and period ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--from", "2027-01-01T00:07:00Z"], "is not the start of a period of 900 s"),
        (["--from", "2027-01-01T01:00:00Z", "--period-s", "7200"], "is not the start of a period"),
        (["--period-s", "0"], "--period-s 0: give a period of 1 to"),
        (["--period-s", "-900"], "--period-s -900: give a period of 1 to"),
        (["--from", "99999999999999999999"], "is out of range"),
        (["--from", "9" * 5000], "is out of range"),
        (["--from", "1969-12-31T23:45:00Z"], "is out of range"),
        (["--from", "²"], "give an ISO time"),
    ],
)
def test_key_record_refuses_a_start_off_the_period_grid_or_out_of_range(
    files: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    code, err = cli(capsys, *record(files, files / "prorata.toml", *extra))
    line = refused(err)
    assert code == 1 and says in line and len(line) < 300


def test_times_are_bounded_to_what_a_date_and_the_registry_can_hold() -> None:
    assert parse_time("2027-01-01T00:15:00Z", "--from") == 1_798_762_500_000
    assert parse_time(str(MAX_TIME_MS - 1), "--to") == MAX_TIME_MS - 1
    for text in (str(MAX_TIME_MS), "0001-01-01T00:00:00+01:00"):
        with pytest.raises(DaiseeError, match="out of range"):
            parse_time(text, "--to")


# -- 5, 6, 9. allocate: folders, files and blocks ------------------------------------------------


def test_allocate_refuses_a_missing_reports_folder_and_a_file_given_as_one(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, *allocate(files, "--reports", str(files / "nonexistent")))
    assert code == 1 and refused(err).endswith("does not exist (give the folder of report proofs)")
    code, err = cli(capsys, *allocate(files, "--reports", str(files / "members.toml")))
    assert code == 1 and "is not a folder" in refused(err)


def test_allocate_creates_no_tree_of_folders_and_says_why_it_cannot_write(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = files / "nonexistent" / "dir"
    code, err = cli(capsys, *allocate(files, "--keys-csv", str(deep / "k.csv")))
    assert code == 1 and f"the folder {deep} does not exist" in refused(err)
    code, err = cli(capsys, *allocate(files, "--periods-csv", str(deep)))
    assert code == 1 and "does not exist" in refused(err)
    tariff = str(files / "tariff.toml")
    bill = ["community", "bill", *allocate(files)[2:], "--tariff", tariff, "--html", str(deep)]
    code, err = cli(capsys, *bill)
    assert code == 1 and refused(err).startswith(f"daisee-node: error: --html {deep}: the folder")
    assert not (files / "nonexistent").exists()
    # the OS's reason, with the path
    code, err = cli(capsys, *allocate(files, "--periods-csv", "/proc/x"))
    assert code == 1 and refused(err) == (
        "daisee-node: error: --periods-csv /proc/x: No such file or directory"
    )
    code, err = cli(capsys, *allocate(files, "--keys-csv", "/proc/x.csv"))
    assert code == 1 and refused(err).endswith("--keys-csv /proc/x.csv: No such file or directory")
    code, err = cli(capsys, *allocate(files, "--keys-csv", str(files)))
    assert code == 1 and "is a folder" in refused(err)
    # a file that exists is left as it was by the check
    kept = files / "keys.csv"
    kept.write_text("yesterday's\n")
    code, err = cli(capsys, *allocate(files, "--keys-csv", str(kept)))
    assert code == 1 and "cannot reach the chain" in err and kept.read_text() == "yesterday's\n"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--from-block", "-5"], "--from-block -5: a block number is 0 or more"),
        (["--block", "-1"], "--block -1: a block number is 0 or more"),
        (["--period-s", "0"], "--period-s 0: give a period of 1 to"),
        (["--period-s", str(10**30)], "give a period of 1 to"),
        (["--to", "9999-12-31", "--period-s", "1"], "periods; give at most 200,000"),
    ],
)
def test_allocate_refuses_negative_blocks_and_bad_periods(
    files: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    code, err = cli(capsys, *allocate(files, *extra))
    assert code == 1 and says in refused(err)


# -- 7. the tariff --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('monthly_fee = "1e999999999"', "too large for an amount"),
        ('surplus_price = "1e-999999999"', "more than 18 decimals"),
        ("credit_price = 1e300", "too large for an amount"),
        ("monthly_fee = 100000000000", "too large for an amount"),
    ],
)
def test_bill_refuses_an_amount_it_cannot_compute_with_the_tariff_file_and_key(
    files: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    tariff = files / "tariff.toml"
    tariff.write_text(f"local_price = 0.15\n{text}\n")
    key = text.split(" = ")[0]
    code, err = cli(capsys, "community", "bill", *allocate(files)[2:], "--tariff", str(tariff))
    (line,) = refused_file(err, tariff)
    assert code == 2 and line.startswith(f"{key}: ") and says in line


def test_a_bill_of_the_largest_figures_and_prices_is_exact() -> None:
    # Wh a uint64 can carry, summed over a month of periods, at the dearest price a tariff takes:
    # far more digits than the default 28 of decimal arithmetic.
    price = Decimal("9999999999.999999999999999999")
    tariff = Tariff(local_price=price, monthly_fee=price, credit_price=price)
    wh = (2**64 - 1) * 3000
    account = MemberMonth(ALICE, "alice", "2026-01", periods=3000, allocated=wh)
    account.settled_bought_wh, account.settled_paid = wh, 2**256 - 1
    b = bill(account, tariff)
    # (2**64 - 1) × 3000 Wh × 9999999999.999999999999999999 / 1000, worked with Fraction and
    # rounded half up to the cent
    assert b.lines[0].amount == Decimal("553402322211286548449999999944.66")
    with localcontext() as ctx:  # the test's own sum, exact too
        ctx.prec = 200
        assert b.total == sum(line.amount for line in b.lines if line.amount is not None)


def test_tariff_amounts_in_range_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('local_price = "0.000000000000000001"\nmonthly_fee = 9999999999\n')
    tariff = load_tariff(path)
    assert tariff.local_price == Decimal("1e-18") and tariff.monthly_fee == 9_999_999_999


def test_month_at_the_end_of_the_calendar_is_one_line(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = allocate(files)[2:-4]
    tariff = str(files / "tariff.toml")
    code, err = cli(capsys, "community", "bill", *args, "--tariff", tariff, "--month", "9999-12")
    assert code == 1 and "give a month" in refused(err)
