//! Bundles: OCI image layouts (a directory, or a tar of one) carrying cached images across an
//! air gap.
