#![no_std]
// This file exists so that the crate has a library target that connwatch/build.rs can
// depend on (cargo then rebuilds the probe when its sources change).
