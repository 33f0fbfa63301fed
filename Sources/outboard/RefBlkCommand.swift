import ArgumentParser

/// `outboard _refblk`: the C reference vhost-user-blk frontend, run as its own process by
/// `bench blk`. Placeholder until the reference lands.
struct RefBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_refblk", shouldDisplay: false)
    func run() throws {}
}
