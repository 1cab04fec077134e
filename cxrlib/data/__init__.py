"""The data layer: IU X-ray reports, PhantomCXR images and the instruction dataset (notebook 01)."""
