// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// The reference for bench/ledger_gas.py: the first DAISEE prototype's approach, one transaction
/// per reading, each stored on chain (the latest per node and channel) and logged.
contract PerReading {
    struct Value {
        uint64 t;
        int192 value;
    }

    mapping(address => mapping(bytes32 => Value)) public latest;

    event Reading(address indexed node, bytes32 indexed channel, uint64 t, int256 value);

    function storeReading(bytes32 channel, uint64 t, int192 value) external {
        latest[msg.sender][channel] = Value(t, value);
        emit Reading(msg.sender, channel, t, value);
    }
}
