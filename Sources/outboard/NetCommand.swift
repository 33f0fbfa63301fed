import ArgumentParser

/// `outboard net ...`: net ports through the manager.
struct NetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Use a net device through the manager.",
        subcommands: [NetTapCommand.self]
    )
}
