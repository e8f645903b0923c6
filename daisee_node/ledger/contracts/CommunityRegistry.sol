// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @dev The one thing this registry asks of the ledger: who governs the community.
interface IGovernedLedger {
    function governance() external view returns (address);
}

/// @dev What the grants section asks of the ledger: whether an address is a registered node.
interface IMemberLedger {
    function heads(address node)
        external
        view
        returns (bool registered, uint64 seq, uint64 t1, uint32 capacityW, uint88 hashLow);
}

/// @title What a DAISEE community decided, on the chain beside its ledger
/// @notice The allocation keys: governance (the ledger's governance account) records the sha256
/// of each allocation key file with the first period it applies to (t in ms, as commitments
/// count time). A key applies from its `fromMs` until the next record's; anyone reads which key
/// applies to a period (`keyFor`) and checks the file they hold against its hash. Records are
/// append-only and a key can only be recorded for a start not yet reached, so nobody chooses a
/// key after seeing the periods it shares: a record whose start is still ahead may be replaced
/// by recording again with the same start (each record emits `KeyRecorded`).
/// @notice Data access grants: a member (a node the ledger registers, acting with its own key)
/// grants a recipient address one data role until a time (ms); the member revokes it at once.
/// Nodes export data to a recipient only under a grant in force, and the recipient's checker
/// (`daisee-node verify-export`) asks `grantInForce` too.
/// @dev Sections of this contract each keep their own storage and events, so later ones (data
/// access grants of members to recipients) are added beside this one without changing it.
contract CommunityRegistry {
    struct KeyRecord {
        bytes32 keyHash;
        uint64 fromMs;
    }

    IGovernedLedger public immutable ledger;

    /// @notice Every key recorded, in order of `fromMs` (strictly increasing).
    KeyRecord[] private _keys;

    /// @notice `index` is the record's place in `keyAt`; a replaced record keeps its index.
    event KeyRecorded(uint256 indexed index, bytes32 indexed keyHash, uint64 fromMs);

    error OnlyGovernance();
    error ZeroHash();
    /// @notice The start is before the chain's clock, or before the last record's start.
    error TooLate();
    error NoKey();

    modifier onlyGovernance() {
        if (msg.sender != ledger.governance()) revert OnlyGovernance();
        _;
    }

    constructor(address ledger_) {
        ledger = IGovernedLedger(ledger_);
    }

    // -- allocation keys ----------------------------------------------------------------------

    /// @notice Record that the key file whose sha256 is `keyHash` applies to the periods
    /// starting at `fromMs` or later (until the next record's start). `fromMs` may not lie before
    /// the chain's clock nor before the last record's start; the same start replaces that record.
    function recordKey(bytes32 keyHash, uint64 fromMs) external onlyGovernance {
        if (keyHash == bytes32(0)) revert ZeroHash();
        if (uint256(fromMs) < block.timestamp * 1000) revert TooLate();
        uint256 n = _keys.length;
        if (n > 0 && fromMs <= _keys[n - 1].fromMs) {
            if (fromMs < _keys[n - 1].fromMs) revert TooLate();
            _keys[n - 1].keyHash = keyHash;
            emit KeyRecorded(n - 1, keyHash, fromMs);
            return;
        }
        _keys.push(KeyRecord(keyHash, fromMs));
        emit KeyRecorded(n, keyHash, fromMs);
    }

    function keyCount() external view returns (uint256) {
        return _keys.length;
    }

    function keyAt(uint256 index) external view returns (bytes32 keyHash, uint64 fromMs) {
        KeyRecord storage r = _keys[index];
        return (r.keyHash, r.fromMs);
    }

    /// @notice The key that applies to the period starting at `tMs`: the last record whose
    /// start is at or before it. Reverts `NoKey` before the first record's start.
    function keyFor(uint64 tMs)
        external
        view
        returns (bytes32 keyHash, uint64 fromMs, uint256 index)
    {
        uint256 lo = 0;
        uint256 hi = _keys.length;
        // The first record starting after tMs; the one before it applies.
        while (lo < hi) {
            uint256 mid = (lo + hi) / 2;
            if (_keys[mid].fromMs <= tMs) lo = mid + 1;
            else hi = mid;
        }
        if (lo == 0) revert NoKey();
        KeyRecord storage r = _keys[lo - 1];
        return (r.keyHash, r.fromMs, lo - 1);
    }

    // -- data access grants -------------------------------------------------------------------

    /// @notice Roles: all of the member's readings; its 15-minute import and export; its period
    /// totals as aggregates (for the grid operator). A grant of one role gives no other.
    uint8 public constant ROLE_OWN = 1;
    uint8 public constant ROLE_SUPPLIER = 2;
    uint8 public constant ROLE_GRID = 3;

    /// @dev member => recipient => role => end of the grant (ms, exclusive); 0: none.
    mapping(address => mapping(address => mapping(uint8 => uint64))) private _grants;

    event Granted(
        address indexed member, address indexed recipient, uint8 indexed role, uint64 untilMs
    );
    event Revoked(address indexed member, address indexed recipient, uint8 indexed role);

    /// @notice The sender is not a node the ledger registers.
    error NotMember();
    error BadRole();
    error ZeroRecipient();
    /// @notice The grant would end at or before the chain's clock.
    error PastUntil();
    /// @notice Nothing to revoke: the sender never granted that role to that recipient.
    error NoGrant();

    /// @notice Grant `recipient` the data role `role` of the sender's node until `untilMs`
    /// (exclusive); a new grant of the same role to the same recipient replaces the last one.
    function grant(address recipient, uint8 role, uint64 untilMs) external {
        (bool registered,,,,) = IMemberLedger(address(ledger)).heads(msg.sender);
        if (!registered) revert NotMember();
        if (role == 0 || role > ROLE_GRID) revert BadRole();
        if (recipient == address(0)) revert ZeroRecipient();
        if (uint256(untilMs) <= block.timestamp * 1000) revert PastUntil();
        _grants[msg.sender][recipient][role] = untilMs;
        emit Granted(msg.sender, recipient, role, untilMs);
    }

    /// @notice End the sender's grant of `role` to `recipient` now. A node the ledger no longer
    /// registers can still revoke what it granted.
    function revoke(address recipient, uint8 role) external {
        if (_grants[msg.sender][recipient][role] == 0) revert NoGrant();
        delete _grants[msg.sender][recipient][role];
        emit Revoked(msg.sender, recipient, role);
    }

    /// @notice When `member`'s grant of `role` to `recipient` ends (ms); 0 when there is none
    /// or it was revoked. It may lie in the past: `grantInForce` compares it with the clock.
    function grantUntil(address member, address recipient, uint8 role)
        external
        view
        returns (uint64)
    {
        return _grants[member][recipient][role];
    }

    function grantInForce(address member, address recipient, uint8 role)
        external
        view
        returns (bool)
    {
        return uint256(_grants[member][recipient][role]) > block.timestamp * 1000;
    }
}
