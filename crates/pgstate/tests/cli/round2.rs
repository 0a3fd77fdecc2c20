//! The command, round 2: exit codes for refused logins, reads on the primary, strict imports.

use crate::{bare, expect, pgstate, unique, url, PASSWORD};

/// A wrong password (28P01) and a database that does not exist (3D000) are connection
/// problems: exit 3, as the help promises.
#[test]
fn a_wrong_password_and_a_missing_database_exit_3() {
    let good = url();
    assert!(good.contains(PASSWORD), "the test URL carries the password");
    let wrong = good.replace(PASSWORD, "not-the-password");
    expect(bare().args(["--url", &wrong, "get", "k"]), 3);
    // (The test URL is postgresql://user:password@host:port/postgres, without a query.)
    let missing = good.replace("/postgres", "/no_such_database");
    expect(bare().args(["--url", &missing, "get", "k"]), 3);
    // The server is fine: a key that is absent is still 1.
    expect(&mut pgstate(&unique("exit"), &["get", "absent"]), 1);
}
