"""Hostile values in a node's config: `inf`, `nan`, huge numbers and booleans where numbers go,
and chain URLs without a host. Each is listed with its TOML path by `check-config`, exit 2,
before `run` could trip over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from daisee_node import cli
from daisee_node.config import parse_config
from daisee_node.errors import ConfigError

PEER = "0x" + "11" * 20
MARKET = "0x" + "33" * 20
NODE = f"""
[node]
id = "a"
data_dir = "data"
[[sensors]]
name = "grid"
kind = "simulated"
model = "grid"
[mqtt]
host = "127.0.0.1"
[[peers]]
id = "b"
address = "{PEER}"
[chain]
rpc_url = "http://127.0.0.1:8545"
ledger_address = "0x{"22" * 20}"
"""


def market(min_price: str = "0.1", **buy: str) -> str:
    keys = {"amount_wh": "500", "max_price": "1.5", "window_min": "30"} | buy
    return (
        NODE
        + f'[market]\naddress = "{MARKET}"\nbuyer_meter = "grid.import_wh"\n'
        + f"min_price = {min_price}\n"
        + '[[market.buy]]\nname = "low"\nwhen = "grid.power_w > 0"\nseller = "b"\n'
        + "".join(f"{k} = {v}\n" for k, v in keys.items())
    )


def check_config(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`daisee-node check-config` on `text`: its exit code and what it printed."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    code = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out + err


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return {p.path: p.message for p in info.value.problems}


def test_a_valid_market_config_is_taken_with_integers_where_decimals_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = check_config(tmp_path, market("0", max_price="2", window_min="60"), capsys)
    assert code == 0, said
    config = parse_config(market("0", max_price="2", window_min="60"))
    assert config.market is not None
    entry = config.market.buy[0]
    assert entry.max_price == 2.0 and isinstance(entry.max_price, float)
    assert entry.window_min == 60.0 and config.market.min_price == 0.0


@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "nan", "1e300"])
def test_an_infinite_or_absurd_price_is_refused_before_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, said = check_config(tmp_path, market(min_price=value, max_price=value), capsys)
    assert code == 2
    lines = said.splitlines()
    assert lines[0].endswith("2 problem(s)")
    assert lines[1].startswith("  - market.min_price: ")
    assert lines[2].startswith("  - market.buy[0].max_price: ")
    assert "Traceback" not in said


def test_no_decimal_of_any_section_may_be_infinite_or_nan() -> None:
    text = (
        NODE.replace('kind = "simulated"', 'kind = "simulated"\ninterval_s = nan')
        + "stuck_after_s = inf\nrpc_timeout_s = inf\nretry_max_s = inf\n[store]\nraw_days = inf\n"
    )
    found = problems_of(text)
    assert set(found) == {
        "sensors[0].interval_s",
        "chain.stuck_after_s",
        "chain.rpc_timeout_s",
        "chain.retry_max_s",
        "store.raw_days",
    }
    assert "finite" in found["sensors[0].interval_s"] and "finite" in found["store.raw_days"]
    # finite, but long enough to overflow a timer or never happen
    found = problems_of(NODE + "stuck_after_s = 1e300\nrpc_timeout_s = 1e12\n")
    assert set(found) == {"chain.stuck_after_s", "chain.rpc_timeout_s"}


def test_booleans_are_not_numbers_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = market("true", amount_wh="true", max_price="true", window_min="false").replace(
        "min_price = true", "max_wh_per_day = true"
    )
    text += '[chain_node]\nrole = "follower"\nauthrpc_port = true\n[[relays]]\nname = "r"\n'
    text += "pin = true\n"
    code, said = check_config(tmp_path, text, capsys)
    assert code == 2
    listed = {line.split(": ")[0].removeprefix("  - ") for line in said.splitlines()[1:]}
    assert listed == {
        "market.max_wh_per_day",
        "market.buy[0].amount_wh",
        "market.buy[0].max_price",
        "market.buy[0].window_min",
        "chain_node.authrpc_port",
        "relays[0].pin",
    }
    assert "expected a number, not a boolean" in said
    # booleans still go where a yes or no is asked
    config = parse_config(NODE + "submit = false\n")
    assert config.chain is not None and config.chain.submit is False


def test_huge_chain_ids_and_blocks_are_refused() -> None:
    found = problems_of(
        NODE + f"chain_id = {2**63}\n" + f'[market]\naddress = "{MARKET}"\nfrom_block = {2**63}\n'
    )
    assert set(found) == {"chain.chain_id", "market.from_block"}
    found = problems_of(NODE + "chain_id = true\n")
    assert found == {"chain.chain_id": "expected a number, not a boolean (got True)"}
    assert parse_config(NODE + f"chain_id = {2**63 - 1}\n").chain.chain_id == 2**63 - 1  # type: ignore[union-attr]


def test_fallbacks_of_an_embedded_chain_are_listed_at_their_key_in_a_line() -> None:
    text = NODE.replace('"http://127.0.0.1:8545"', '"embedded"')
    text += 'rpc_fallback_urls = ["http://10.0.0.2:8545"]\n'
    found = problems_of(text)
    assert found == {
        "chain.rpc_fallback_urls": "an embedded chain has no other node "
        "(got ['http://10.0.0.2:8545'])"
    }


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://", "names no host"),
        ("https://a b", "no spaces"),
        ("http://:8545", "names no host"),
        ("http://10.0.0.2:99999", "port"),
        ("ftp://10.0.0.2", "http(s)"),
    ],
)
def test_a_chain_url_needs_a_host_and_no_spaces(url: str, reason: str) -> None:
    text = NODE + f'rpc_fallback_urls = ["http://10.0.0.2:8545", "{url}"]\n'
    found = problems_of(text)
    assert (
        list(found) == ["chain.rpc_fallback_urls[1]"]
        and reason in found["chain.rpc_fallback_urls[1]"]
    )
    found = problems_of(NODE.replace('"http://127.0.0.1:8545"', f'"{url}"'))
    assert list(found) == ["chain.rpc_url"] and reason in found["chain.rpc_url"]


def test_chain_urls_with_a_host_are_taken() -> None:
    urls = ["http://10.0.0.2:8545", "https://chain.example/rpc?key=x", "http://[::1]:8545"]
    config = parse_config(NODE + f"rpc_fallback_urls = {urls!r}\n".replace("'", '"'))
    assert config.chain is not None and config.chain.rpc_fallback_urls == urls


def test_an_empty_path_is_refused_not_taken_for_the_current_folder() -> None:
    text = NODE.replace('data_dir = "data"', 'data_dir = ""')
    text += 'keystore = " "\npassword_file = ""\n'
    reason = "an empty path; name a file or a folder"
    assert problems_of(text) == {
        "node.data_dir": f"{reason} (got '')",
        "chain.keystore": f"{reason} (got ' ')",
        "chain.password_file": f"{reason} (got '')",
    }


def test_a_check_across_a_table_names_it_without_repeating_the_table() -> None:
    """A problem of a whole `[[sensors]]` entry is said in one line, not followed by the entry
    printed back as a Python dict; a single value is still shown as given."""
    found = problems_of(
        '[node]\nid = "x"\n[[sensors]]\nname = "line"\nkind = "ads1115"\nbus = "fake"\n'
        'channel = 0\ncurrent_sensor = "sct013-030"\nmode = "ac"\n'
    )
    assert found["sensors[0]"].endswith("needs a [sensors.fake] table describing the signal")
    assert "{" not in found["sensors[0]"]
    found = problems_of('[node]\nid = "x"\ntime_speed = "many"\n')
    assert any("(got 'many')" in message for message in found.values())
