// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title Energy credits of a DAISEE microgrid
/// @notice One credit per `whPerCredit` watt-hours a node exported (the "Helios Coin" idea).
/// Only the ledger that created this token mints, and only for committed export totals.
contract EnergyCredit is ERC20 {
    address public immutable ledger;
    uint256 public immutable whPerCredit;

    error OnlyLedger();

    constructor(uint256 whPerCredit_) ERC20("DAISEE Energy Credit", "DEC") {
        require(whPerCredit_ > 0, "whPerCredit is zero");
        ledger = msg.sender;
        whPerCredit = whPerCredit_;
    }

    /// @notice Mint credits to `node` for `wh` exported watt-hours (fractions of a credit kept).
    function mintFor(address node, uint256 wh) external {
        if (msg.sender != ledger) revert OnlyLedger();
        _mint(node, (wh * 10 ** decimals()) / whPerCredit);
    }
}
