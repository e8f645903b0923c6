// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {DaiseeLedger} from "./DaiseeLedger.sol";

/// @title Peer-to-peer energy orders of a DAISEE microgrid, settled from committed meter data
/// @notice A buyer opens an order to a seller (Wh, price in credit base units per kWh, a delivery
/// window [t0, t1) in ms as commitments count time, mode GRID or LINE) and escrows its whole
/// price in energy credits; or a seller posts an offer that a buyer takes (an accepted order at
/// once). The seller accepts or refuses before t0; the buyer may cancel before acceptance; an
/// order nobody accepted expires at t0 (anyone returns its escrow). Nothing here trusts an
/// oracle: anyone settles from what the ledger recorded.
///
/// GRID: one settlement per order and period, from the seller's and the buyer's commitments of
/// that same period (equal boundaries, inside the window, proven with `verifyCommitment`).
/// Sharing rule: a node's committed export of a period is shared among the accepted GRID orders
/// it sells whose window holds the whole period, pro rata of each order's ordered amount (fixed
/// at acceptance), floored, the remaining Wh (fewer than the orders) going one each to the
/// orders with the lowest ids; the buyer's committed import is shared among its orders the
/// same way. An order gets min(seller share, buyer share, Wh still undelivered). Every input
/// of a share is fixed before the period starts (orders are accepted before their t0 and a
/// period is settled only after it ends), so shares do not depend on which order, or which
/// period, is settled first; an order's total is min(sum of its per-period matches, amount)
/// whatever the sequence, and its payment is always floor(delivered × price / 1000). A share
/// another order cannot use is not passed on: that is the price of order independence (the
/// weights are the ordered amounts, not what is left of them, because what is left depends on
/// which periods were settled before). Each
/// node holds at most MAX_ACTIVE accepted GRID orders per side at once; an order leaves that
/// list once t1 + grace has passed, when no period it covers can be settled any more.
///
/// LINE: both ends count the line's energy on a channel named in the order (a counter in Wh,
/// readings in millionths). `anchorLine` fixes each end's starting reading (within lineSlackMs
/// of t0); each `settleLine` brings each end's next reading, proven with `verifyReading`
/// against that node's recorded commitment; intervals chain (the next starts where the last
/// ended), so none is counted twice. When the two increments agree within toleranceBps of the
/// larger, the lower counts as delivered. Beyond it a dispute opens: governance may decide any
/// value between the two proven increments before the dispute deadline (having checked more
/// readings of both sides against the chain), or anyone closes it after the deadline and the
/// lower value stands. End readings of an interval lie within lineSlackMs of each other and
/// of the window.
///
/// Payments move to the seller as delivery is settled. After t1 + grace (and no open dispute)
/// anyone returns the rest of the escrow to the buyer. Settling a GRID period is possible until
/// its end + grace; a LINE interval until t1 + grace. A buyer who never commits a period (or
/// never lets its line readings be proven) pays nothing for it: the escrow returns after grace.
/// Amounts are uint64 Wh and prices uint128, so amount × price < 2^192 never overflows; line
/// counter increments are taken as uint256 (counters only rise), compared in 512 bits
/// (Math.mulDiv) and added saturating. Whatever moves credits changes state first and is
/// nonReentrant: the credit is a plain ERC20 without hooks, but this holds against any token.
contract EnergyMarket is ReentrancyGuard {
    using SafeERC20 for IERC20;

    enum Mode {
        GRID,
        LINE
    }

    enum State {
        NONE,
        OPEN,
        ACCEPTED,
        REFUSED,
        CANCELLED,
        EXPIRED,
        CLOSED
    }

    struct Order {
        address buyer;
        uint64 amountWh;
        Mode mode;
        State state;
        address seller;
        uint64 t0;
        uint64 t1;
        uint128 pricePerKWh;
        uint64 deliveredWh;
        uint32 openDisputes;
        bytes32 sellerChannel;
        bytes32 buyerChannel;
    }

    struct Offer {
        address seller;
        uint64 amountWh;
        Mode mode;
        address buyer;
        uint64 t0;
        uint64 t1;
        uint128 pricePerKWh;
        uint64 minWh;
        bytes32 sellerChannel;
    }

    /// @dev Each end's last settled line reading, and the agreed energy so far (micro-Wh).
    struct Line {
        uint64 sellerT;
        uint64 buyerT;
        int256 sellerMicro;
        int256 buyerMicro;
        uint256 agreedMicro;
    }

    struct Dispute {
        uint256 orderId;
        uint256 lowMicro;
        uint256 highMicro;
        uint64 deadline;
        uint64 t0;
        uint64 t1;
        bool open;
    }

    /// @notice One proven reading of a line counter: the commitment holding it, that
    /// commitment's batch proof, the reading and its Merkle proof.
    struct LineProof {
        DaiseeLedger.Commitment c;
        bytes32[] batchProof;
        DaiseeLedger.Reading r;
        bytes32[] proof;
    }

    uint256 public constant MAX_ACTIVE = 8;
    uint256 public constant MAX_BPS = 10_000;
    uint256 private constant MICRO = 1_000_000;

    DaiseeLedger public immutable ledger;
    IERC20 public immutable credit;
    uint64 public immutable graceMs;
    uint64 public immutable disputeMs;
    uint64 public immutable lineSlackMs;
    uint16 public toleranceBps;

    uint256 public orderCount;
    uint256 public offerCount;
    uint256 public disputeCount;
    mapping(uint256 => Order) public orders;
    mapping(uint256 => Offer) public offers;
    mapping(uint256 => Line) public lines;
    mapping(uint256 => Dispute) public disputes;
    /// @notice GRID periods settled, by order and period start.
    mapping(uint256 => mapping(uint64 => bool)) public periodSettled;
    mapping(address => uint256[]) private _selling;
    mapping(address => uint256[]) private _buying;

    event OrderOpened(
        uint256 indexed id,
        address indexed buyer,
        address indexed seller,
        uint64 amountWh,
        uint128 pricePerKWh,
        uint64 t0,
        uint64 t1,
        Mode mode
    );
    event OrderAccepted(uint256 indexed id);
    event OrderRefused(uint256 indexed id);
    event OrderCancelled(uint256 indexed id);
    event OrderExpired(uint256 indexed id);
    event OfferPosted(
        uint256 indexed offerId,
        address indexed seller,
        address buyer,
        uint64 amountWh,
        uint64 minWh,
        uint128 pricePerKWh,
        uint64 t0,
        uint64 t1,
        Mode mode
    );
    event OfferTaken(uint256 indexed offerId, uint256 indexed orderId, uint64 amountWh);
    event OfferWithdrawn(uint256 indexed offerId);
    /// @notice Delivery settled for [t0, t1) (a GRID period, or a LINE interval by the
    /// seller's reading times); `deliveredWh` is what this settlement added.
    event Settled(uint256 indexed id, uint64 t0, uint64 t1, uint64 deliveredWh, uint256 paid);
    event LineAnchored(uint256 indexed id, uint64 sellerT, uint64 buyerT);
    event LineMeasured(uint256 indexed id, uint256 sellerMicro, uint256 buyerMicro);
    event DisputeOpened(
        uint256 indexed disputeId,
        uint256 indexed orderId,
        uint256 lowMicro,
        uint256 highMicro,
        uint64 deadline
    );
    event DisputeClosed(
        uint256 indexed disputeId, uint256 indexed orderId, uint256 deliveredMicro, bool decided
    );
    event Refunded(uint256 indexed id, uint256 amount);
    event ToleranceSet(uint16 bps);

    error OnlyGovernance();
    error NotBuyer();
    error NotSeller();
    error BadOrder();
    error BadState();
    error TooLate();
    error TooEarly();
    error TooManyOrders();
    error WrongMode();
    error NotProven();
    error WrongNode();
    error OutsideWindow();
    error PeriodMismatch();
    error AlreadySettled();
    error BadReading();
    error DisputesOpen();
    error OutOfRange();

    constructor(
        DaiseeLedger ledger_,
        uint64 graceMs_,
        uint64 disputeMs_,
        uint64 lineSlackMs_,
        uint16 toleranceBps_
    ) {
        if (toleranceBps_ > MAX_BPS) revert OutOfRange();
        ledger = ledger_;
        credit = IERC20(address(ledger_.credit()));
        graceMs = graceMs_;
        disputeMs = disputeMs_;
        lineSlackMs = lineSlackMs_;
        toleranceBps = toleranceBps_;
        emit ToleranceSet(toleranceBps_);
    }

    // -- views ---------------------------------------------------------------------------

    /// @notice The price of `amountWh` at `pricePerKWh` credit base units per kWh (floored).
    function cost(uint64 amountWh, uint128 pricePerKWh) public pure returns (uint256) {
        return (uint256(amountWh) * pricePerKWh) / 1000;
    }

    /// @notice Credits still escrowed for order `id`.
    function escrowOf(uint256 id) public view returns (uint256) {
        Order storage o = orders[id];
        if (o.state != State.OPEN && o.state != State.ACCEPTED) return 0;
        return cost(o.amountWh, o.pricePerKWh) - cost(o.deliveredWh, o.pricePerKWh);
    }

    /// @notice The accepted GRID orders `node` sells (or buys) that may still be settled.
    function activeOrders(address node, bool selling) external view returns (uint256[] memory) {
        return selling ? _selling[node] : _buying[node];
    }

    /// @notice Order `id`'s share of `total` Wh that its seller exported (`selling`) or its
    /// buyer imported over the period [pt0, pt1), by the sharing rule above.
    function shareOf(uint256 id, bool selling, uint64 pt0, uint64 pt1, uint256 total)
        public
        view
        returns (uint256)
    {
        Order storage o = orders[id];
        uint256[] storage list = selling ? _selling[o.seller] : _buying[o.buyer];
        uint256 weights;
        for (uint256 i = 0; i < list.length; ++i) {
            Order storage p = orders[list[i]];
            if (p.t0 <= pt0 && pt1 <= p.t1) weights += p.amountWh;
        }
        if (weights == 0) return 0;
        uint256 floors;
        uint256 rank;
        for (uint256 i = 0; i < list.length; ++i) {
            Order storage p = orders[list[i]];
            if (p.t0 <= pt0 && pt1 <= p.t1) {
                floors += (total * p.amountWh) / weights;
                if (list[i] < id) ++rank;
            }
        }
        uint256 share = (total * o.amountWh) / weights;
        return rank < total - floors ? share + 1 : share;
    }

    // -- orders and offers ---------------------------------------------------------------

    /// @notice Open an order to `seller` and escrow its price (approve `cost(...)` first).
    /// LINE orders name the line's counter channel at each end; GRID orders pass zeros.
    function open(
        address seller,
        uint64 amountWh,
        uint128 pricePerKWh,
        uint64 t0,
        uint64 t1,
        Mode mode,
        bytes32 sellerChannel,
        bytes32 buyerChannel
    ) external nonReentrant returns (uint256 id) {
        if (seller == address(0) || seller == msg.sender) revert BadOrder();
        _checkTerms(amountWh, t0, t1, mode, sellerChannel, buyerChannel);
        id = _create(msg.sender, seller, amountWh, pricePerKWh, t0, t1, mode);
        Order storage o = orders[id];
        o.state = State.OPEN;
        o.sellerChannel = sellerChannel;
        o.buyerChannel = buyerChannel;
        credit.safeTransferFrom(msg.sender, address(this), cost(amountWh, pricePerKWh));
    }

    /// @notice The seller takes order `id` on (before its window starts).
    function accept(uint256 id) external {
        Order storage o = orders[id];
        if (msg.sender != o.seller) revert NotSeller();
        if (o.state != State.OPEN) revert BadState();
        if (_nowMs() >= o.t0) revert TooLate();
        o.state = State.ACCEPTED;
        if (o.mode == Mode.GRID) _enlist(id, o.seller, o.buyer);
        emit OrderAccepted(id);
    }

    /// @notice The seller declines order `id`: its escrow returns to the buyer.
    function refuse(uint256 id) external nonReentrant {
        Order storage o = orders[id];
        if (msg.sender != o.seller) revert NotSeller();
        _return(id, State.REFUSED);
        emit OrderRefused(id);
    }

    /// @notice The buyer withdraws order `id` before the seller accepted it.
    function cancel(uint256 id) external nonReentrant {
        if (msg.sender != orders[id].buyer) revert NotBuyer();
        _return(id, State.CANCELLED);
        emit OrderCancelled(id);
    }

    /// @notice Anyone returns the escrow of an order nobody accepted before its window began.
    function expire(uint256 id) external nonReentrant {
        if (_nowMs() < orders[id].t0) revert TooEarly();
        _return(id, State.EXPIRED);
        emit OrderExpired(id);
    }

    /// @notice Offer `amountWh`, taken in parts of at least `minWh` (or what is left), by
    /// `buyer` only unless it is zero. The minimum keeps takers from filling the seller's
    /// MAX_ACTIVE GRID orders with crumbs.
    function postOffer(
        uint64 amountWh,
        uint64 minWh,
        uint128 pricePerKWh,
        uint64 t0,
        uint64 t1,
        Mode mode,
        bytes32 sellerChannel,
        address buyer
    ) external returns (uint256 offerId) {
        if (buyer == msg.sender || minWh > amountWh) revert BadOrder();
        // The buyer's channel comes with each take; check the rest with a stand-in.
        bytes32 standIn = mode == Mode.LINE ? bytes32(uint256(1)) : bytes32(0);
        _checkTerms(amountWh, t0, t1, mode, sellerChannel, standIn);
        offerId = ++offerCount;
        offers[offerId] =
            Offer(msg.sender, amountWh, mode, buyer, t0, t1, pricePerKWh, minWh, sellerChannel);
        emit OfferPosted(offerId, msg.sender, buyer, amountWh, minWh, pricePerKWh, t0, t1, mode);
    }

    function withdrawOffer(uint256 offerId) external {
        if (msg.sender != offers[offerId].seller) revert NotSeller();
        delete offers[offerId];
        emit OfferWithdrawn(offerId);
    }

    /// @notice Take `amountWh` of an offer: an accepted order, its price escrowed at once.
    function takeOffer(uint256 offerId, uint64 amountWh, bytes32 buyerChannel)
        external
        nonReentrant
        returns (uint256 id)
    {
        Offer storage f = offers[offerId];
        address seller = f.seller;
        if (seller == address(0)) revert BadState();
        if (seller == msg.sender || (f.buyer != address(0) && f.buyer != msg.sender)) {
            revert NotBuyer();
        }
        if (amountWh == 0 || amountWh > f.amountWh) revert BadOrder();
        if (amountWh < f.minWh && amountWh != f.amountWh) revert BadOrder();
        if (_nowMs() >= f.t0) revert TooLate();
        if ((f.mode == Mode.LINE) != (buyerChannel != bytes32(0))) revert WrongMode();
        f.amountWh -= amountWh;
        id = _create(msg.sender, seller, amountWh, f.pricePerKWh, f.t0, f.t1, f.mode);
        Order storage o = orders[id];
        o.state = State.ACCEPTED;
        o.sellerChannel = f.sellerChannel;
        o.buyerChannel = buyerChannel;
        if (o.mode == Mode.GRID) _enlist(id, seller, msg.sender);
        emit OfferTaken(offerId, id, amountWh);
        emit OrderAccepted(id);
        credit.safeTransferFrom(msg.sender, address(this), cost(amountWh, o.pricePerKWh));
    }

    // -- settlement ----------------------------------------------------------------------

    /// @notice Settle one period of GRID order `id` from the seller's and the buyer's recorded
    /// commitments of that period. Anyone may call it, once per order and period.
    function settleGrid(
        uint256 id,
        DaiseeLedger.Commitment calldata sellerC,
        bytes32[] calldata sellerProof,
        DaiseeLedger.Commitment calldata buyerC,
        bytes32[] calldata buyerProof
    ) external nonReentrant returns (uint64 deliveredWh) {
        Order storage o = orders[id];
        if (o.state != State.ACCEPTED) revert BadState();
        if (o.mode != Mode.GRID) revert WrongMode();
        if (sellerC.node != o.seller || buyerC.node != o.buyer) revert WrongNode();
        if (sellerC.t0 != buyerC.t0 || sellerC.t1 != buyerC.t1) revert PeriodMismatch();
        if (sellerC.t0 < o.t0 || sellerC.t1 > o.t1) revert OutsideWindow();
        uint256 nowMs = _nowMs();
        if (nowMs < sellerC.t1) revert TooEarly();
        if (nowMs >= uint256(sellerC.t1) + graceMs) revert TooLate();
        if (periodSettled[id][sellerC.t0]) revert AlreadySettled();
        if (!ledger.verifyCommitment(sellerC, sellerProof)) revert NotProven();
        if (!ledger.verifyCommitment(buyerC, buyerProof)) revert NotProven();
        periodSettled[id][sellerC.t0] = true;
        uint256 matched = Math.min(
            shareOf(id, true, sellerC.t0, sellerC.t1, sellerC.exportWh),
            shareOf(id, false, sellerC.t0, sellerC.t1, buyerC.importWh)
        );
        deliveredWh = _deliver(id, matched, sellerC.t0, sellerC.t1);
    }

    /// @notice Fix each end's starting line reading (within lineSlackMs of the window start).
    function anchorLine(uint256 id, LineProof calldata seller, LineProof calldata buyer)
        external
    {
        Order storage o = orders[id];
        if (o.state != State.ACCEPTED) revert BadState();
        if (o.mode != Mode.LINE) revert WrongMode();
        Line storage l = lines[id];
        if (l.sellerT != 0 || l.buyerT != 0) revert AlreadySettled();
        if (_nowMs() >= uint256(o.t1) + graceMs) revert TooLate();
        _checkLine(seller, o.seller, o.sellerChannel);
        _checkLine(buyer, o.buyer, o.buyerChannel);
        uint256 lo = o.t0 > lineSlackMs ? o.t0 - lineSlackMs : 0;
        uint256 hi = uint256(o.t0) + lineSlackMs;
        if (seller.r.tMs < lo || seller.r.tMs > hi || buyer.r.tMs < lo || buyer.r.tMs > hi) {
            revert OutsideWindow();
        }
        // A reading at time 0 would read as "not anchored"; no real reading is taken then.
        if (seller.r.tMs == 0 || buyer.r.tMs == 0) revert BadReading();
        l.sellerT = seller.r.tMs;
        l.buyerT = buyer.r.tMs;
        l.sellerMicro = seller.r.valueMicro;
        l.buyerMicro = buyer.r.valueMicro;
        emit LineAnchored(id, seller.r.tMs, buyer.r.tMs);
    }

    /// @notice Settle the line energy from each end's last settled reading to the one given.
    /// @return disputeId zero when the ends agreed within tolerance, else the dispute opened
    function settleLine(uint256 id, LineProof calldata seller, LineProof calldata buyer)
        external
        nonReentrant
        returns (uint256 disputeId)
    {
        Order storage o = orders[id];
        if (o.state != State.ACCEPTED) revert BadState();
        if (o.mode != Mode.LINE) revert WrongMode();
        if (_nowMs() >= uint256(o.t1) + graceMs) revert TooLate();
        Line storage l = lines[id];
        if (l.sellerT == 0) revert TooEarly();
        _checkLine(seller, o.seller, o.sellerChannel);
        _checkLine(buyer, o.buyer, o.buyerChannel);
        uint64 sellerT0 = l.sellerT;
        uint256 dSeller = _advance(seller.r, sellerT0, l.sellerMicro, o.t1);
        uint256 dBuyer = _advance(buyer.r, l.buyerT, l.buyerMicro, o.t1);
        uint256 gap = seller.r.tMs > buyer.r.tMs
            ? seller.r.tMs - buyer.r.tMs
            : buyer.r.tMs - seller.r.tMs;
        if (gap > lineSlackMs) revert PeriodMismatch();
        l.sellerT = seller.r.tMs;
        l.buyerT = buyer.r.tMs;
        l.sellerMicro = seller.r.valueMicro;
        l.buyerMicro = buyer.r.valueMicro;
        emit LineMeasured(id, dSeller, dBuyer);
        uint256 low = Math.min(dSeller, dBuyer);
        uint256 high = Math.max(dSeller, dBuyer);
        if (high - low > Math.mulDiv(high, toleranceBps, MAX_BPS)) {
            disputeId = ++disputeCount;
            uint64 deadline = uint64(_nowMs() + disputeMs);
            disputes[disputeId] = Dispute(id, low, high, deadline, sellerT0, seller.r.tMs, true);
            ++o.openDisputes;
            emit DisputeOpened(disputeId, id, low, high, deadline);
            return disputeId;
        }
        _addLine(id, low, sellerT0, seller.r.tMs);
    }

    /// @notice Governance decides a dispute before its deadline: any value between the two
    /// ends' proven increments (micro-Wh).
    function resolveDispute(uint256 disputeId, uint256 deliveredMicro) external nonReentrant {
        if (msg.sender != ledger.governance()) revert OnlyGovernance();
        Dispute storage d = disputes[disputeId];
        if (!d.open) revert BadState();
        if (_nowMs() >= d.deadline) revert TooLate();
        if (deliveredMicro < d.lowMicro || deliveredMicro > d.highMicro) revert OutOfRange();
        _close(disputeId, deliveredMicro, true);
    }

    /// @notice After its deadline anyone closes an undecided dispute: the lower value stands.
    function closeDispute(uint256 disputeId) external nonReentrant {
        Dispute storage d = disputes[disputeId];
        if (!d.open) revert BadState();
        if (_nowMs() < d.deadline) revert TooEarly();
        _close(disputeId, d.lowMicro, false);
    }

    /// @notice After t1 + grace (and no open dispute) anyone returns the undelivered rest of
    /// the escrow to the buyer; the order is closed.
    function refund(uint256 id) external nonReentrant {
        Order storage o = orders[id];
        if (o.state != State.ACCEPTED) revert BadState();
        if (_nowMs() < uint256(o.t1) + graceMs) revert TooEarly();
        if (o.openDisputes != 0) revert DisputesOpen();
        uint256 rest = escrowOf(id);
        o.state = State.CLOSED;
        emit Refunded(id, rest);
        credit.safeTransfer(o.buyer, rest);
    }

    function setTolerance(uint16 bps) external {
        if (msg.sender != ledger.governance()) revert OnlyGovernance();
        if (bps > MAX_BPS) revert OutOfRange();
        toleranceBps = bps;
        emit ToleranceSet(bps);
    }

    // -- internals -----------------------------------------------------------------------

    function _nowMs() internal view returns (uint256) {
        return block.timestamp * 1000;
    }

    function _checkTerms(
        uint64 amountWh,
        uint64 t0,
        uint64 t1,
        Mode mode,
        bytes32 sellerChannel,
        bytes32 buyerChannel
    ) internal view {
        if (amountWh == 0 || t1 <= t0) revert BadOrder();
        if (_nowMs() >= t0) revert TooLate();
        bool line = mode == Mode.LINE;
        if (line != (sellerChannel != bytes32(0)) || line != (buyerChannel != bytes32(0))) {
            revert WrongMode();
        }
    }

    function _create(
        address buyer,
        address seller,
        uint64 amountWh,
        uint128 pricePerKWh,
        uint64 t0,
        uint64 t1,
        Mode mode
    ) internal returns (uint256 id) {
        id = ++orderCount;
        Order storage o = orders[id];
        o.buyer = buyer;
        o.amountWh = amountWh;
        o.mode = mode;
        o.seller = seller;
        o.t0 = t0;
        o.t1 = t1;
        o.pricePerKWh = pricePerKWh;
        emit OrderOpened(id, buyer, seller, amountWh, pricePerKWh, t0, t1, mode);
    }

    /// @dev Returns the whole escrow of an order nobody accepted; state first, then transfer.
    function _return(uint256 id, State next) internal {
        Order storage o = orders[id];
        if (o.state != State.OPEN) revert BadState();
        uint256 amount = cost(o.amountWh, o.pricePerKWh);
        o.state = next;
        emit Refunded(id, amount);
        credit.safeTransfer(o.buyer, amount);
    }

    function _enlist(uint256 id, address seller, address buyer) internal {
        _push(_selling[seller], id);
        _push(_buying[buyer], id);
    }

    /// @dev Drops the orders none of whose periods can be settled any more, then adds `id`.
    function _push(uint256[] storage list, uint256 id) internal {
        uint256 nowMs = _nowMs();
        for (uint256 i = list.length; i > 0; --i) {
            if (nowMs >= uint256(orders[list[i - 1]].t1) + graceMs) {
                list[i - 1] = list[list.length - 1];
                list.pop();
            }
        }
        if (list.length >= MAX_ACTIVE) revert TooManyOrders();
        list.push(id);
    }

    /// @dev Adds up to `matchedWh` to the order's delivery and pays the seller for it.
    function _deliver(uint256 id, uint256 matchedWh, uint64 t0, uint64 t1)
        internal
        returns (uint64 added)
    {
        Order storage o = orders[id];
        uint64 before = o.deliveredWh;
        added = uint64(Math.min(matchedWh, o.amountWh - before));
        o.deliveredWh = before + added;
        uint256 paid = cost(before + added, o.pricePerKWh) - cost(before, o.pricePerKWh);
        emit Settled(id, t0, t1, added, paid);
        if (paid > 0) credit.safeTransfer(o.seller, paid);
    }

    function _addLine(uint256 id, uint256 micro, uint64 t0, uint64 t1) internal {
        Line storage l = lines[id];
        // Saturates rather than reverts: a dispute must always be closable, or the escrow
        // could never be refunded (only absurd int256-wide counters come near).
        uint256 agreed = l.agreedMicro;
        agreed = micro > type(uint256).max - agreed ? type(uint256).max : agreed + micro;
        l.agreedMicro = agreed;
        uint256 wh = Math.min(agreed / MICRO, orders[id].amountWh);
        _deliver(id, wh - orders[id].deliveredWh, t0, t1);
    }

    function _close(uint256 disputeId, uint256 micro, bool decided) internal {
        Dispute storage d = disputes[disputeId];
        d.open = false;
        uint256 id = d.orderId;
        --orders[id].openDisputes;
        emit DisputeClosed(disputeId, id, micro, decided);
        _addLine(id, micro, d.t0, d.t1);
    }

    function _checkLine(LineProof calldata p, address node, bytes32 channel) internal view {
        if (p.c.node != node) revert WrongNode();
        if (p.r.channel != channel) revert BadReading();
        if (!ledger.verifyReading(p.c, p.batchProof, p.r, p.proof)) revert NotProven();
    }

    /// @dev The counter's increase since the last settled reading.
    function _advance(DaiseeLedger.Reading calldata r, uint64 lastT, int256 lastMicro, uint64 t1)
        internal
        view
        returns (uint256)
    {
        if (r.tMs <= lastT) revert AlreadySettled();
        if (r.tMs > uint256(t1) + lineSlackMs) revert OutsideWindow();
        if (r.valueMicro < lastMicro) revert BadReading();
        // r.valueMicro >= lastMicro, so the true difference fits in uint256 (in int256 it
        // could overflow); two's complement subtraction modulo 2^256 gives it exactly.
        unchecked {
            return uint256(r.valueMicro) - uint256(lastMicro);
        }
    }
}
