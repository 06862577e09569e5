"""The audit ledger: append-only records, their hash chain and Merkle tree, signed checkpoints, evidence.

Modules, from the bottom up; each imports only modules above it in this list:

    merkle           RFC 9162 hashes, compact ranges, inclusion and consistency proofs (pure)
    signed_note      C2SP signed notes and tlog checkpoints, Ed25519 verifier keys (pure)
    chain            a record's stored text, the genesis value and the chain-hash rule (pure)
    tiles            the stored tile hashes and the tree state the writer extends
    checkpoints      the signed head and the checkpoint history
    archive          the archived prefix that retention leaves behind
    verify           recompute chain, tiles and signed roots from the records
    proofs           inclusion and consistency proofs from the stored tiles, and their verifier
    stdout           the audit line printer
    store            ``Ledger``: appending, reading, the one list of migrations
    export           audit lines, and export bundles (lines, checkpoint, compact range) written from the vault
    export_verify    export bundles, and the checkpoints an auditor kept, checked without the ledger
    archive_bundles  archived records read back from archive bundles, a tile at a time (``--archive``)
    follow           continuous export to a file
    operations       what combines several of the above for an operator: archive, export to a file

Nothing below ``store`` knows of ``Ledger``; nothing here knows of HTTP, the pipeline, the policy or the
CLI (the appliance key comes from ``appliance.signing_keys``).
"""
