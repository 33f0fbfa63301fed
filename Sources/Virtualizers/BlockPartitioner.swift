import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A block partitioner: a virtualizer that holds one session to a device (through the
/// manager) and serves sessions of its own, one per partition, to its clients. This is
/// what "chainable sessions" means: client -> partitioner -> driver, each hop a session
/// with its own queues, regions and doorbells, and the same control protocol (clients
/// use `BlockSession.open` against the partitioner's socket as they would against the
/// manager).
///
/// Each client sees its partition as a whole device starting at sector 0; requests are
/// range-checked against the partition and shifted onto the upstream device. Data is
/// copied between the client's region and the partitioner's upstream region (a client's
/// region cannot be shared with the driver without exposing it to the other partitions'
/// traffic; a zero-copy partitioner would register each client region with the manager).
/// Because the upstream session is a `BlockSession`, a driver restart below is invisible
/// here: the upstream reissues, the partition clients only see a pause.
///
/// Access: only peers with the partitioner's own uid, or root, may connect.
public final class BlockPartitioner {
    public struct Partition: Sendable {
        public var name: String
        public var firstSector: UInt64
        public var sectorCount: UInt64
        public init(name: String, firstSector: UInt64, sectorCount: UInt64) {
            self.name = name; self.firstSector = firstSector; self.sectorCount = sectorCount
        }
    }

    var upstream: BlockSession
    let partitions: [Partition]
    let listener: UnixListener
    let epoll: Epoll
    var clients: [UInt64: PartitionClient] = [:]
    var nextID: UInt64 = 1
    /// Upstream bounce slots: one per upstream tag, `slotBytes` each.
    let slotBytes: Int
    var freeSlots: [Int]
    /// What each upstream slot carries, recorded after validation: the completion is routed
    /// and copied by this record, never by anything the client can change later.
    var slotOwner: [(client: UInt64, tag: UInt32, offset: Int, length: Int)]
    let results: UnsafeMutableBufferPointer<BlockResult>
    let requests: UnsafeMutableBufferPointer<BlockRequest>
    /// Client requests waiting for an upstream slot.
    var waiting: [(client: UInt64, request: BlockRequest)] = []

    public init(upstream: consuming BlockSession, partitions: [Partition], socketPath: String) throws(SessionError) {
        let end = upstream.info.blockCount
        for p in partitions where p.firstSector > end || p.sectorCount > end - p.firstSector || p.sectorCount == 0 {
            throw .invalidRequest("partition \(p.name) (\(p.firstSector)+\(p.sectorCount)) outside the device's \(end) sectors")
        }
        let depth = upstream.queueDepth
        slotBytes = upstream.buffer.count / depth / blockSectorSize * blockSectorSize
        guard slotBytes >= blockSectorSize else { throw .invalidRequest("upstream data region too small for \(depth) slots") }
        freeSlots = Array(0..<depth)
        slotOwner = Array(repeating: (0, 0, 0, 0), count: depth)
        results = .allocate(capacity: depth)
        requests = .allocate(capacity: 32)
        do {
            listener = try UnixListener(path: socketPath)
            epoll = try Epoll()
            try epoll.add(listener.fd.raw, events: .readable, token: 0)
        } catch {
            throw .system(error)
        }
        self.partitions = partitions
        self.upstream = upstream
    }

    deinit {
        results.deallocate()
        requests.deallocate()
    }

    /// Serves for up to `milliseconds`: accepts clients, moves requests down and
    /// completions up. Call in a loop (on a thread of its own).
    public func serve(milliseconds: Int) throws(SessionError) {
        let until = Clock.monotonicNanoseconds + UInt64(milliseconds) * 1_000_000
        while Clock.monotonicNanoseconds < until {
            var work = try pumpUpstream()
            for id in clients.keys.sorted() { work += serveClient(id) }
            if work == 0 {
                let events: [Epoll.Event]
                do { events = try epoll.wait(maxEvents: 16, timeoutMilliseconds: 1) } catch { throw .system(error) }
                for e in events { handle(e.token) }
            }
        }
    }

    func handle(_ token: UInt64) {
        if token == 0 {
            accept()
        } else if let c = clients[token >> 1] {
            if token & 1 == 0 { controlMessage(c) } else { _ = try? c.endpoint.requestBell.drain() }
        }
    }

    func accept() {
        guard let s = try? listener.accept() else { return }
        let id = nextID
        nextID += 1
        // Authentication: the partitioner's own uid or root.
        guard let creds = try? s.peerCredentials(), creds.uid == getuid() || creds.uid == 0 else {
            try? s.send(.failure(.permissionDenied, "not allowed to use this partitioner"))
            return
        }
        let d: ControlDelivery
        do {
            // Bounded wait for the open request (the loop serves nobody meanwhile; a
            // non-blocking handshake state is left for a production partitioner).
            guard try s.waitReadable(timeoutMilliseconds: 100) else { return }
            d = try s.receiveControl()
        } catch {
            try? s.send(.failure(.malformed, "\(error)"))
            return
        }
        guard case .openSession(let m) = d.message else {
            try? s.send(.failure(.malformed, "expected openSession"))
            return
        }
        guard m.deviceClass == .block else {
            try? s.send(.failure(.invalidArgument, "partitions are block devices, not \(m.deviceClass)"))
            return
        }
        guard let p = partitions.first(where: { $0.name == m.device }) else {
            try? s.send(.failure(.unknownDevice, "no partition named '\(m.device)'"))
            return
        }
        guard m.queueDepth >= 2, m.queueDepth <= 256, m.queueDepth.nonzeroBitCount == 1,
              m.dataBytes > 0, m.dataBytes <= 64 << 20 else {
            try? s.send(.failure(.invalidArgument, "queue depth must be a power of two in 2...256, data 1 byte...64 MiB"))
            return
        }
        do {
            let c = try PartitionClient(id: id, socket: s, partition: p, request: m, upstream: upstream.info)
            try c.socket.send(.sessionOpened(c.opened), descriptors: c.resources.openedDescriptors)
            try epoll.add(c.socket.fd.raw, events: .readable, token: id << 1)
            try epoll.add(c.endpoint.requestBell.fd.raw, events: .readable, token: id << 1 | 1)
            clients[id] = c
        } catch {
            return
        }
    }

    func controlMessage(_ c: PartitionClient) {
        // Clients send nothing after open; anything else (or a close) ends the session.
        _ = try? c.socket.receiveControl(nonBlocking: true)
        drop(c.id)
    }

    func drop(_ id: UInt64) {
        guard let c = clients.removeValue(forKey: id) else { return }
        try? epoll.remove(c.socket.fd.raw)
        try? epoll.remove(c.endpoint.requestBell.fd.raw)
        waiting.removeAll { $0.client == id }
        // Requests of this client still upstream complete into nothing (their slots are
        // recycled in pumpUpstream).
    }

    func serveClient(_ id: UInt64) -> Int {
        guard let c = clients[id] else { return 0 }
        let n = c.endpoint.requests.dequeue(into: requests)
        if n == 0 {
            if c.endpoint.failure != nil { drop(id) }
            return 0
        }
        for i in 0..<n {
            let r = requests[i]
            // A tag already in flight means the client broke the protocol (and would make
            // us route two completions by one tag): the session ends.
            guard !c.inFlight[Int(r.tag)] else {
                drop(id)
                return i
            }
            c.inFlight[Int(r.tag)] = true
            waiting.append((id, r))
        }
        return n
    }

    /// Sends waiting requests down while slots are free; completes finished ones up.
    func pumpUpstream() throws(SessionError) -> Int {
        var work = 0
        while !waiting.isEmpty, let slot = freeSlots.last {
            let (id, r) = waiting.removeFirst()
            guard let c = clients[id] else { continue }
            if let status = c.check(r, maxBytes: min(slotBytes, Int(upstream.info.maxTransfer))) {
                c.complete(BlockCompletion(tag: r.tag, status: status, generation: upstream.generation))
                continue
            }
            // Checked: op known; for reads and writes the range lies in the partition and
            // the buffer in the client's region.
            let op = BlockOp(rawValue: r.op)!
            let length = op == .flush ? 0 : Int(r.length)
            let offset = op == .flush ? 0 : Int(r.offset.rawValue)
            if op == .write {
                (upstream.buffer.baseAddress! + slot * slotBytes).copyMemory(from: c.endpoint.data.base + offset, byteCount: length)
            }
            let sector = op == .flush ? 0 : r.sector + c.partition.firstSector
            let user = UInt64(slot) | id << 32
            let tag: UInt32?
            do {
                tag = try upstream.submit(op, sector: sector, offset: slot * slotBytes, length: length, userData: user)
            } catch .invalidRequest {
                c.complete(BlockCompletion(tag: r.tag, status: .invalid, generation: upstream.generation))
                continue
            }
            guard tag != nil else {
                waiting.insert((id, r), at: 0)
                break
            }
            slotOwner[slot] = (id, r.tag, offset, length)
            freeSlots.removeLast()
            work += 1
        }
        let n = try upstream.poll(into: results)
        for i in 0..<n {
            let res = results[i]
            let slot = Int(res.userData & 0xFFFF)
            let owner = slotOwner[slot]
            freeSlots.append(slot)
            guard owner.client == res.userData >> 32, let c = clients[owner.client] else { continue }
            if res.op == .read && res.status == .ok {
                (c.endpoint.data.base + owner.offset).copyMemory(from: upstream.buffer.baseAddress! + slot * slotBytes,
                                                                 byteCount: owner.length)
            }
            c.complete(BlockCompletion(tag: owner.tag, status: res.status ?? .ioError, generation: res.generation))
        }
        return work + n
    }
}

/// One client session of the partitioner: its resources are made as the manager makes a
/// session's (SessionResources), and it is served through a BlockServerEndpoint, as a
/// driver would.
final class PartitionClient {
    let id: UInt64
    let socket: UnixSocket
    let partition: BlockPartitioner.Partition
    let resources: SessionResources
    var endpoint: BlockServerEndpoint
    let opened: SessionOpened
    /// Tags the client has in flight here (a tag reused while in flight ends the session).
    var inFlight: [Bool]

    init(id: UInt64, socket: consuming UnixSocket, partition: BlockPartitioner.Partition, request m: OpenSession,
         upstream: BlockInfo) throws {
        self.id = id
        self.socket = socket
        self.partition = partition
        let r = try SessionResources(name: "outboard-partition-\(id)", deviceClass: .block, queueDepth: m.queueDepth,
                                     dataBytes: Int(m.dataBytes))
        r.publish(generation: 1, state: .serving)
        let dataBytes = UInt64(r.data.size)
        let a = Attach(sessionID: id, tableIndex: 0, queueDepth: m.queueDepth, writable: m.writable, dataBytes: dataBytes)
        endpoint = try BlockServerEndpoint(a, queues: r.queues.fd.duplicate(), data: r.data.fd.duplicate(),
                                           requestBell: r.requestBell.fd.duplicate(), completionBell: r.completionBell.fd.duplicate())
        resources = r
        opened = SessionOpened(sessionID: id, generation: 1, queueDepth: m.queueDepth, writable: m.writable, dataBytes: dataBytes,
                               classInfo: .block(BlockInfo(blockSize: UInt32(blockSectorSize), blockCount: partition.sectorCount,
                                                           maxTransfer: upstream.maxTransfer, flags: [.flush])))
        inFlight = Array(repeating: false, count: Int(m.queueDepth))
    }

    /// nil when `r` may go upstream; otherwise the status to complete it with.
    func check(_ r: BlockRequest, maxBytes: Int) -> BlockStatus? {
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        if op == .flush { return nil }
        if op == .write && !opened.writable { return .readOnly }
        let sectors = UInt64(r.length) / UInt64(blockSectorSize)
        guard r.length > 0, r.length % UInt32(blockSectorSize) == 0, Int(r.length) <= maxBytes,
              r.sector <= partition.sectorCount, sectors <= partition.sectorCount - r.sector,
              r.offset.rawValue <= UInt64(endpoint.data.size), UInt64(r.length) <= UInt64(endpoint.data.size) - r.offset.rawValue else {
            return .invalid
        }
        return nil
    }

    func complete(_ c: BlockCompletion) {
        inFlight[Int(c.tag)] = false
        withUnsafePointer(to: c) { p in
            _ = endpoint.complete(UnsafeBufferPointer(start: p, count: 1))
        }
    }
}
