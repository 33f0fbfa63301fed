import OutboardSystem
import SystemPackage

/// Everything the serving side creates for one session, in one place: the header page
/// (sealed: the client maps it read-only), the queues (laid out and initialised for the
/// session's class), the data region and the two doorbells. The manager holds one per
/// session across driver restarts (and renews the queues after each); a virtualizer holds
/// one per client session it serves.
///
/// The descriptors go out in the order `SessionOpened` and `Attach` carry them.
public struct SessionResources: ~Copyable {
    public let deviceClass: DeviceClass
    public let queueDepth: UInt32
    public let header: SharedRegion
    public let headerMapping: SharedMapping
    public let headerPage: SessionHeaderPage
    public private(set) var queues: SharedRegion
    public let data: SharedRegion
    public let requestBell: Doorbell
    public let completionBell: Doorbell
    let name: String

    /// `name` names the regions (memfd names, seen in /proc); `dataBytes` is a whole
    /// number of pages, checked by the caller against its limits.
    public init(name: String, deviceClass: DeviceClass, queueDepth: UInt32, dataBytes: Int) throws(SessionSetupError) {
        // Noncopyable members are built as locals on one straight path, then stored.
        let h = try Self.system { () throws(Errno) in try SharedRegion(name: "\(name)-header", size: SessionHeaderPage.byteCount) }
        let hm = try Self.system { () throws(Errno) in try h.map(.readWrite) }
        // From here on nobody can map the header writable: the client gets it read-only.
        try Self.system { () throws(Errno) in try h.sealFutureWrites() }
        let q = try Self.makeQueues(name: name, deviceClass: deviceClass, depth: queueDepth)
        let d = try Self.system { () throws(Errno) in try SharedRegion(name: "\(name)-data", size: dataBytes) }
        let rb = try Self.system { () throws(Errno) in try Doorbell() }
        let cb = try Self.system { () throws(Errno) in try Doorbell() }
        self.name = name
        self.deviceClass = deviceClass
        self.queueDepth = queueDepth
        headerPage = SessionHeaderPage(hm.base)
        header = h
        headerMapping = hm
        queues = q
        data = d
        requestBell = rb
        completionBell = cb
    }

    static func system<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(SessionSetupError) -> T {
        do { return try body() } catch { throw .system(error) }
    }

    static func makeQueues(name: String, deviceClass: DeviceClass, depth: UInt32) throws(SessionSetupError) -> SharedRegion {
        switch deviceClass {
        case .block:
            let layout: BlockQueueLayout
            do { layout = try BlockQueueLayout(queueDepth: Int(depth)) } catch { throw .queue(error) }
            let region = try system { () throws(Errno) in try SharedRegion(name: "\(name)-queues", size: layout.byteCount) }
            let m = try system { () throws(Errno) in try region.map(.readWrite) }
            do { try layout.initialize(memory: m.base, size: m.size) } catch { throw .queue(error) }
            return region
        case .net:
            let layout: NetQueueLayout
            do { layout = try NetQueueLayout(queueDepth: Int(depth)) } catch { throw .queue(error) }
            let region = try system { () throws(Errno) in try SharedRegion(name: "\(name)-queues", size: layout.byteCount) }
            let m = try system { () throws(Errno) in try region.map(.readWrite) }
            do { try layout.initialize(memory: m.base, size: m.size) } catch { throw .queue(error) }
            return region
        }
    }

    /// Fresh queues (a dead driver may have left the old ones in any state). The old
    /// region's descriptor closes; mappings of it elsewhere live on until unmapped.
    public mutating func replaceQueues() throws(SessionSetupError) {
        queues = try Self.makeQueues(name: name, deviceClass: deviceClass, depth: queueDepth)
    }

    /// For `SessionOpened`: header, queues, data, request doorbell, completion doorbell.
    public var openedDescriptors: [FileDescriptor] {
        [header.fd.raw, queues.fd.raw, data.fd.raw, requestBell.fd.raw, completionBell.fd.raw]
    }

    /// For `Attach`: queues, data, request doorbell, completion doorbell.
    public var attachDescriptors: [FileDescriptor] {
        [queues.fd.raw, data.fd.raw, requestBell.fd.raw, completionBell.fd.raw]
    }

    public func publish(generation: UInt64, state: SessionState) {
        headerPage.publish(generation: generation, state: state)
    }
}
