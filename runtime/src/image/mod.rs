pub mod own_kernel;
