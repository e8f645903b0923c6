// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {EnergyCredit} from "./EnergyCredit.sol";

/// @title The commitment ledger of a DAISEE microgrid
/// @notice Nodes keep their readings; each period they sign a commitment (a Merkle root of the
/// period's readings plus its energy totals). Anyone may submit a batch of signed commitments.
/// Accepted commitments of a batch are hashed into one batch root, so a batch costs one storage
/// slot however many commitments it carries; any commitment (and so its period totals) and any
/// reading can be proven against it later (`verifyCommitment`, `verifyReading`). The
/// `Committed` event names each accepted commitment by its hash; the commitment itself is in
/// the transaction's input, where anyone can read it.
/// Each node's commitments are accepted strictly in order (seq = head + 1, prevHash chaining
/// the previous one), and no period total may exceed what the node's connection can carry:
/// governance sets each node's capacity in watts, and a commitment claiming more than
/// capacity × (t1 − t0) imported or exported is refused, so neither a broken meter nor a
/// stolen key can mint without bound. Energy credits are minted once for each run of one
/// node's commitments in a batch (the sum of their exports).
contract DaiseeLedger is EIP712 {
    struct Commitment {
        address node;
        uint64 seq;
        uint64 t0;
        uint64 t1;
        bytes32 root;
        uint32 count;
        uint64 importWh;
        uint64 exportWh;
        bytes32 prevHash;
        bytes32 rulesHash;
    }

    struct Reading {
        bytes32 channel;
        uint64 tMs;
        int256 valueMicro;
        uint8 quality;
    }

    /// @dev One slot per node: registration, the last accepted seq and period end, the node's
    /// capacity in watts, and the low 88 bits of the last commitment's hash (enough to check the
    /// next one's `prevHash`: the node signs that field, so it only has to tell its own
    /// commitments apart).
    struct Head {
        bool registered;
        uint64 seq;
        uint64 t1;
        uint32 capacityW;
        uint88 hashLow;
    }

    bytes32 public constant COMMITMENT_TYPEHASH = keccak256(
        "Commitment(address node,uint64 seq,uint64 t0,uint64 t1,bytes32 root,uint32 count,"
        "uint64 importWh,uint64 exportWh,bytes32 prevHash,bytes32 rulesHash)"
    );

    // Reasons a commitment of a batch is skipped (the rest of the batch still counts).
    uint8 public constant BAD_SIGNATURE = 1;
    uint8 public constant NOT_REGISTERED = 2;
    uint8 public constant STALE_SEQ = 3;
    uint8 public constant BAD_PERIOD = 4;
    uint8 public constant BAD_PREV_HASH = 5;
    /// @notice The seq is beyond the next one: it waits for the ones before it (nothing changes).
    uint8 public constant NOT_NEXT = 6;
    /// @notice importWh or exportWh is more than the node's capacity over the period.
    uint8 public constant OVER_CAPACITY = 7;
    uint256 private constant MS_PER_HOUR = 3_600_000;

    EnergyCredit public immutable credit;
    address public governance;
    mapping(address => Head) public heads;
    /// @notice Block in which each batch root was recorded (0: never).
    mapping(bytes32 => uint256) public batchBlock;

    event NodeAdded(address indexed node, uint32 capacityW);
    event CapacitySet(address indexed node, uint32 capacityW);
    event NodeRemoved(address indexed node);
    event GovernanceTransferred(address indexed previous, address indexed next);
    event Committed(address indexed node, uint64 indexed seq, bytes32 commitmentHash);
    event Rejected(address indexed node, uint64 indexed seq, uint8 reason);
    event BatchRecorded(bytes32 indexed root, uint256 accepted);

    error OnlyGovernance();
    error LengthMismatch();

    modifier onlyGovernance() {
        if (msg.sender != governance) revert OnlyGovernance();
        _;
    }

    constructor(address governance_, uint256 whPerCredit) EIP712("DAISEE", "1") {
        governance = governance_;
        credit = new EnergyCredit(whPerCredit);
        emit GovernanceTransferred(address(0), governance_);
    }

    // -- governance ----------------------------------------------------------------------

    /// @notice Register `node` (or re-register a removed one, which keeps its seq) with the
    /// largest power, in watts, its connection can import or export (e.g. 36,000 W, the largest
    /// French household connection). Its commitments may claim at most
    /// capacityW × (t1 − t0) / 3,600,000 Wh of import and of export (t in ms).
    function addNode(address node, uint32 capacityW) external onlyGovernance {
        Head storage head = heads[node];
        head.registered = true;
        head.capacityW = capacityW;
        emit NodeAdded(node, capacityW);
    }

    /// @notice Change a node's capacity in watts (see `addNode`); applies to later commitments.
    function setCapacity(address node, uint32 capacityW) external onlyGovernance {
        heads[node].capacityW = capacityW;
        emit CapacitySet(node, capacityW);
    }

    /// @notice A removed node keeps its seq, so re-adding it never lets old commitments replay.
    function removeNode(address node) external onlyGovernance {
        heads[node].registered = false;
        emit NodeRemoved(node);
    }

    function transferGovernance(address next) external onlyGovernance {
        emit GovernanceTransferred(governance, next);
        governance = next;
    }

    // -- commitments -----------------------------------------------------------------------

    /// @notice EIP-712 `hashStruct(c)`, also what the next commitment's `prevHash` names.
    function commitmentHash(Commitment calldata c) public pure returns (bytes32 h) {
        bytes32 typehash = COMMITMENT_TYPEHASH;
        // The struct is ten static words in calldata, laid out as EIP-712 encodes them: hash
        // them in place. Words with dirty high bits give a hash no node signed, so such a
        // commitment only ever fails its signature check.
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            calldatacopy(add(m, 0x20), c, 0x140)
            h := keccak256(m, 0x160)
        }
    }

    /// @notice The EIP-712 digest a node signs for commitment `c`.
    function digest(Commitment calldata c) public view returns (bytes32) {
        return _hashTypedDataV4(commitmentHash(c));
    }

    /// @notice Record signed commitments. Invalid ones are skipped with a `Rejected` event and
    /// change nothing: one whose seq is not the node's next (`NOT_NEXT`) can be submitted again
    /// once the ones before it are in. The accepted ones' hashes, in order, are the leaves of
    /// the batch root.
    /// @return root the batch root (zero when nothing was accepted)
    /// @return accepted how many commitments were recorded
    function commitBatch(Commitment[] calldata cs, bytes[] calldata signatures)
        external
        returns (bytes32 root, uint256 accepted)
    {
        if (cs.length != signatures.length) revert LengthMismatch();
        bytes32[] memory hashes = new bytes32[](cs.length);
        // Credits are minted once per run of one node's commitments, not once per commitment.
        address minting;
        uint256 exportWh;
        for (uint256 i = 0; i < cs.length; ++i) {
            Commitment calldata c = cs[i];
            bytes32 h = commitmentHash(c);
            (uint8 reason, uint32 capacityW) = _check(c, h, signatures[i]);
            if (reason != 0) {
                emit Rejected(c.node, c.seq, reason);
                continue;
            }
            heads[c.node] = Head(true, c.seq, c.t1, capacityW, uint88(uint256(h)));
            hashes[accepted++] = h;
            emit Committed(c.node, c.seq, h);
            if (c.node != minting) {
                if (exportWh > 0) credit.mintFor(minting, exportWh);
                minting = c.node;
                exportWh = 0;
            }
            exportWh += c.exportWh;
        }
        if (exportWh > 0) credit.mintFor(minting, exportWh);
        if (accepted > 0) {
            root = _root(hashes, accepted);
            batchBlock[root] = block.number;
            emit BatchRecorded(root, accepted);
        }
    }

    function _check(Commitment calldata c, bytes32 h, bytes calldata signature)
        internal
        view
        returns (uint8 reason, uint32 capacityW)
    {
        if (signature.length != 65) return (BAD_SIGNATURE, 0);
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(
            _hashTypedDataV4(h),
            uint8(signature[64]),
            bytes32(signature[0:32]),
            bytes32(signature[32:64])
        );
        if (err != ECDSA.RecoverError.NoError || signer != c.node) return (BAD_SIGNATURE, 0);
        Head memory head = heads[c.node];
        if (!head.registered) return (NOT_REGISTERED, 0);
        if (c.seq <= head.seq) return (STALE_SEQ, 0);
        if (c.seq != head.seq + 1) return (NOT_NEXT, 0);
        if (c.t1 <= c.t0 || c.t0 < head.t1) return (BAD_PERIOD, 0);
        if (uint88(uint256(c.prevHash)) != head.hashLow) return (BAD_PREV_HASH, 0);
        // Wh × 3.6e6 against W × ms: exact, no rounding, no overflow in 256 bits.
        uint256 limit = uint256(head.capacityW) * (c.t1 - c.t0);
        if (uint256(c.importWh) * MS_PER_HOUR > limit) return (OVER_CAPACITY, 0);
        if (uint256(c.exportWh) * MS_PER_HOUR > limit) return (OVER_CAPACITY, 0);
        return (0, head.capacityW);
    }

    // -- proofs ----------------------------------------------------------------------------

    function readingLeaf(address node, Reading calldata r) public pure returns (bytes32) {
        return keccak256(abi.encode(node, r.channel, r.tMs, r.valueMicro, r.quality));
    }

    /// @notice True when commitment `c`, totals included, was recorded: `batchProof` leads
    /// from its hash to a batch root the ledger stored. A settlement contract calls this with
    /// a commitment and its proof to rely on the commitment's period totals.
    function verifyCommitment(Commitment calldata c, bytes32[] calldata batchProof)
        public
        view
        returns (bool)
    {
        return batchBlock[MerkleProof.processProofCalldata(batchProof, commitmentHash(c))] != 0;
    }

    /// @notice True when `c` was recorded (in the batch `batchProof` leads to) and reading `r`
    /// is one of its leaves.
    function verifyReading(
        Commitment calldata c,
        bytes32[] calldata batchProof,
        Reading calldata r,
        bytes32[] calldata proof
    ) external view returns (bool) {
        if (!verifyCommitment(c, batchProof)) return false;
        if (r.tMs < c.t0 || r.tMs >= c.t1) return false;
        return MerkleProof.verifyCalldata(proof, c.root, readingLeaf(c.node, r));
    }

    /// @dev Pairs neighbours level by level (sorted-pair keccak, as OpenZeppelin's MerkleProof
    /// expects); an odd node at the end of a level moves up unchanged.
    function _root(bytes32[] memory h, uint256 n) internal pure returns (bytes32) {
        while (n > 1) {
            uint256 m = 0;
            for (uint256 i = 0; i < n; i += 2) {
                h[m++] = i + 1 < n ? _hashPair(h[i], h[i + 1]) : h[i];
            }
            n = m;
        }
        return h[0];
    }

    function _hashPair(bytes32 a, bytes32 b) private pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }
}
