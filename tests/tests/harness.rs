//! The test harness itself: the `vhdtool` binary is found (and built if needed) from another
//! package's tests.

use vhdkit_tests::{output, vhdtool, vhdtool_bin};

#[test]
fn vhdtool_binary_is_built_and_found() {
    let bin = vhdtool_bin();
    assert!(bin.is_file(), "{}", bin.display());
    // It starts; whatever it says without arguments, it must not be killed by a signal.
    let out = output(vhdtool());
    assert!(
        out.status.code().is_some(),
        "vhdtool died: {:?}",
        out.status
    );
}
