pub mod mls_net;
